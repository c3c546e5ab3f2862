"""MNIST from its IDX files (LeCun's format), plain or gzip-compressed.

An IDX file starts with a big-endian magic number: two zero bytes, a type code (0x08 = unsigned byte)
and the number of dimensions, followed by one big-endian uint32 size per dimension and the data.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ...errors import HessgapError

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# where, under the user's root, the files may be (torchvision keeps them in MNIST/raw)
MNIST_SUBDIRS = (".", "MNIST/raw", "mnist", "MNIST")

_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file of unsigned bytes (``.gz`` is decompressed)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise HessgapError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise HessgapError(f"{path} is not an IDX file (its magic number must start with two zero bytes)")
    if raw[2] != _UBYTE:
        raise HessgapError(f"{path}: IDX type code 0x{raw[2]:02x} is not unsigned byte (0x08), as MNIST uses")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise HessgapError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    held = len(raw) - header
    if held != expected:
        what = ("it is truncated (cut off while copied or downloaded)" if held < expected
                else f"it holds {held - expected} byte{'s' if held - expected > 1 else ''} more than its header says: "
                     "the header or the data is corrupt")
        raise HessgapError(
            f"{path}: the header promises {shape} = {expected} bytes of data but the file holds {held}; {what}. "
            "Replace it with the original MNIST file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for sub in MNIST_SUBDIRS:
        for name in (stem, stem + ".gz"):
            candidate = root / sub / name
            if candidate.is_file():
                return candidate
    return None


def load_mnist(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images N×H×W uint8, train_labels, test_images, test_labels) from the IDX files under ``root``."""
    root = Path(root).expanduser()
    found = {key: _find(root, stem) for key, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[key] for key, path in found.items() if path is None]
    if missing:
        where = ", ".join(str(root / sub) for sub in MNIST_SUBDIRS)
        state = "does not exist" if not root.is_dir() else "lacks some files"
        raise HessgapError(
            f"MNIST directory {root} {state}: expected the IDX files {', '.join(MNIST_FILES.values())} "
            f"(each also accepted as .gz) in one of: {where}; missing: {', '.join(missing)}. "
            "hessgap downloads nothing: put the four files there."
        )
    arrays = {key: read_idx(path) for key, path in found.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.size == 0:  # a valid but empty file would only fail deep in training ("use at most 0")
            raise HessgapError(
                f"{found[f'{split}_images']} holds no images (its header says {images.shape}); the file is empty or "
                "was written incompletely: replace it with the original MNIST file"
            )
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise HessgapError(
                f"MNIST {split} files disagree: images {images.shape} (expected N×H×W) and labels {labels.shape} "
                f"(expected N) in {found[f'{split}_images'].parent}"
            )
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]
