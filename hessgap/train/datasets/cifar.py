"""CIFAR-10 and CIFAR-100 from the python pickles of the official archives.

CIFAR-10: ``data_batch_1`` … ``data_batch_5`` and ``test_batch``, each a dict with ``b"data"`` (N × 3072
uint8, channel-major 3×32×32) and ``b"labels"``. CIFAR-100: ``train`` and ``test`` with ``b"data"`` and
``b"fine_labels"`` (100 classes). The files may sit in the named directory or in the archive's folder
(``cifar-10-batches-py`` / ``cifar-100-python``) inside it.

A pickle may name any function for the unpickler to call, so a file is read by :class:`_CifarUnpickler`,
which admits only what a CIFAR batch is made of: dicts, lists, bytes and numbers (no function needed) and
numpy arrays (numpy's array and dtype constructors). A file naming anything else is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ...errors import HessgapError

CIFAR_LAYOUT = {
    "cifar10": {
        "subdir": "cifar-10-batches-py",
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
        "label_key": b"labels",
        "classes": 10,
    },
    "cifar100": {
        "subdir": "cifar-100-python",
        "train": ("train",),
        "test": ("test",),
        "label_key": b"fine_labels",
        "classes": 100,
    },
}


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as pickles of protocol < 3 call it to rebuild bytes (``(text, "latin1")``); no other codec."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode called with {type(text).__name__} and {encoding!r}, not as "
                                     "a pickle of bytes calls it")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """``bytes()``, as pickles of protocol < 3 rebuild empty bytes (an empty array's data)."""
    return b""


def _array_globals() -> dict[tuple[str, str], object]:
    """(module, name) → object of what pickled numpy arrays call: ``_reconstruct`` (protocols 0-4) and
    ``_frombuffer`` (protocol 5), under numpy 1's module names (the official archives) and numpy 2's; and
    what Python 3's pickles of protocol < 3 call to rebuild bytes."""
    sample = np.zeros(1, np.uint8)
    reconstruct, frombuffer = sample.__reduce_ex__(2)[0], sample.__reduce_ex__(5)[0]
    admitted = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes,
                ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}
    for package in ("numpy.core", "numpy._core"):
        admitted[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        admitted[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return admitted


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a class or function that a CIFAR batch does not hold."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, bytes, numbers and numpy arrays (``encoding="bytes"``, as
    the official files were written by Python 2)."""

    _admitted = _array_globals()

    def __init__(self, file):
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str):
        try:
            return self._admitted[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f).load()
    except _RefusedGlobal as exc:
        raise HessgapError(
            f"CIFAR file {path} names {exc.name}, which a CIFAR batch does not hold (only numpy arrays, lists, bytes "
            "and numbers): hessgap will not unpickle it, since that could run code. Replace it with the file of the "
            "official 'python version' archive"
        ) from None
    except Exception as exc:  # unpickling raises many types on a damaged file
        raise HessgapError(f"cannot read CIFAR file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(entry, dict) or b"data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise HessgapError(f"{path} is not a CIFAR batch: expected a dict with b'data' and {label_key!r}, found {keys}")
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise HessgapError(
            f"{path}: b'data' has shape {data.shape} (expected N × 3072) for {labels.shape[0]} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images N×3×32×32 uint8, train_labels, test_images, test_labels) for ``cifar10``/``cifar100``."""
    layout = CIFAR_LAYOUT[name]
    root = Path(root).expanduser()
    files = layout["train"] + layout["test"]
    candidates = [root, root / layout["subdir"]]
    directory = next((d for d in candidates if all((d / f).is_file() for f in files)), None)
    if directory is None:
        missing = [f for f in files if not any((d / f).is_file() for d in candidates)]
        state = "does not exist" if not root.is_dir() else "lacks some files"
        raise HessgapError(
            f"{name.upper()} directory {root} {state}: expected the python-pickle files {', '.join(files)} "
            f"in {root} or in {root / layout['subdir']}; missing: {', '.join(missing) or 'none in one place'}. "
            "hessgap downloads nothing: unpack the official 'python version' archive there."
        )
    parts = {split: [_read_batch(directory / f, layout["label_key"]) for f in layout[split]]
             for split in ("train", "test")}
    out = []
    for split in ("train", "test"):
        out.append(np.concatenate([d for d, _ in parts[split]]))
        out.append(np.concatenate([y for _, y in parts[split]]))
    x_train, y_train, x_test, y_test = out
    for split, images in (("train", x_train), ("test", x_test)):
        if len(images) == 0:  # valid but empty pickles would only fail deep in training
            raise HessgapError(
                f"the {name.upper()} {split} files in {directory} ({', '.join(layout[split])}) hold no images; "
                "replace them with the files of the official 'python version' archive"
            )
    for split, labels in (("train", y_train), ("test", y_test)):
        if labels.size and (labels.min() < 0 or labels.max() >= layout["classes"]):
            raise HessgapError(
                f"{name.upper()} {split} labels in {directory} run from {labels.min()} to {labels.max()}, "
                f"outside 0..{layout['classes'] - 1}"
            )
    return x_train, y_train, x_test, y_test
