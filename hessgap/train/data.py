"""The data sets hessgap trains on, with fixed train/test splits, and seeded loaders.

``digits`` (scikit-learn's 8×8 handwritten digits, shipped with the package: the default) and
``mnist1d`` (generated here) need no files. ``mnist`` reads the IDX files and ``cifar10`` / ``cifar100``
the python pickles from a directory the user names; nothing is ever downloaded.

Inputs are float32; labels are int64. ``preprocess="standardize"`` (the default) standardizes the images
with statistics of the training split (per channel), so the same scale holds for every network;
``preprocess="none"`` keeps the pixel intensities scaled to [0, 1] (digits' 0..16 and MNIST's and CIFAR's
0..255 divided by their full scale), as the authors' code fed them (``X /= 255``). MNIST-1D is the same
either way: its generator's own global scaling is part of the data set's definition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from .. import _checks
from ..errors import HessgapError
from ..names import DATASET_NAMES, DATASETS_ON_DISK, PREPROCESS_NAMES, dataset_name

__all__ = ["DATASET_NAMES", "SMALL_BATCH", "Dataset", "epoch_seed", "large_batch_size", "load_dataset", "make_loader"]


@dataclass
class Dataset:
    """A train/test pair of ``TensorDataset`` (float32 inputs, int64 labels) and what the models need to know.

    ``input_shape`` is (C, H, W) for images or (L,) for flat signals; ``image`` says whether spatial
    augmentation (rotations, translations) makes sense; ``flip_ok`` whether horizontal flips keep the class.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    image: bool
    flip_ok: bool
    source: str = ""

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def to(self, device: torch.device | str) -> Dataset:
        """The same data with its tensors on ``device`` (loaders then index on the device)."""
        move = lambda ds: TensorDataset(*(t.to(device) for t in ds.tensors))  # noqa: E731
        return Dataset(self.name, move(self.train), move(self.test), self.input_shape, self.num_classes,
                       self.image, self.flip_ok, self.source)

    def with_class_labels(self) -> Dataset:
        """This data set with its labels (each split's last tensor) as int64 class indices: the same object when
        they are, a copy of the labels when they are another integer type (int32 and smaller: torch's
        cross-entropy takes int64 only); labels that are not class indices in 0..num_classes − 1 raise."""
        splits = []
        for split, where in ((self.train, "train"), (self.test, "test")):
            *inputs, labels = split.tensors
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise HessgapError(
                    f"data set {self.name!r}: the {where} split's labels are {labels.dtype}; the training loss is "
                    "cross-entropy over class indices: use integer labels (labels.long())"
                )
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise HessgapError(
                    f"data set {self.name!r}: the {where} split's labels run from {int(labels.min())} to "
                    f"{int(labels.max())}, outside 0..{self.num_classes - 1} for num_classes={self.num_classes}"
                )
            splits.append(split if labels.dtype == torch.int64 else TensorDataset(*inputs, labels.long()))
        if splits[0] is self.train and splits[1] is self.test:
            return self
        return dataclasses.replace(self, train=splits[0], test=splits[1])

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "image": self.image,
            "flip_ok": self.flip_ok,
            "source": self.source,
        }


def _as_unit_float(pixels: np.ndarray, full_scale: float) -> np.ndarray:
    """Integer pixels as float32 in [0, 1], in one allocation."""
    return np.divide(pixels, np.float32(full_scale), dtype=np.float32)


def _standardize(train: np.ndarray, test: np.ndarray, channel_axis: int | None,
                 preprocess: str = "standardize") -> tuple[np.ndarray, np.ndarray]:
    """(x − mean) / std with the training split's statistics, in float32 and in place (CIFAR is 600 MB);
    with ``preprocess="none"`` the arrays as they are (in float32)."""
    train = train.astype(np.float32, copy=False)
    test = test.astype(np.float32, copy=False)
    if preprocess == "none":
        return train, test
    dims = tuple(a for a in range(train.ndim) if a != channel_axis)  # channel_axis None: every axis
    # torch reduces without materializing (x − mean)²
    var, mean = torch.var_mean(torch.from_numpy(train), dim=dims, keepdim=True, correction=0)
    std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    for x in (train, test):
        tensor = torch.from_numpy(x)
        tensor.sub_(mean).div_(std)
    return train, test


def _pair(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                         torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


def _check_labels(name: str, labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise HessgapError(
            f"{name} labels in {where} run from {labels.min()} to {labels.max()}, outside 0..{num_classes - 1}"
        )


def _load_digits(seed: int, preprocess: str) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = _as_unit_float(digits.images[:, None], 16)  # N × 1 × 8 × 8, pixel values 0..16
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    x_train, x_test = _standardize(x_train, x_test, channel_axis=1, preprocess=preprocess)
    return Dataset("digits", _pair(x_train, y_train), _pair(x_test, y_test), (1, 8, 8), 10, image=True,
                   flip_ok=False, source=f"scikit-learn load_digits, stratified 80/20 split (seed {seed})"
                   + _described(preprocess))


def _load_mnist1d(seed: int) -> Dataset:
    from .datasets.mnist1d import generate

    x_train, y_train, x_test, y_test = generate(seed)
    return Dataset("mnist1d", _pair(x_train, y_train), _pair(x_test, y_test), (x_train.shape[1],), 10,
                   image=False, flip_ok=False, source=f"MNIST-1D generated locally (Greydanus 2020 defaults, seed {seed})")


def _described(preprocess: str) -> str:
    return "; pixels in [0, 1], not standardized" if preprocess == "none" else ""


def _load_mnist(root: Path, preprocess: str) -> Dataset:
    from .datasets.idx import load_mnist

    x_train, y_train, x_test, y_test = load_mnist(root)
    for split, labels in (("train", y_train), ("test", y_test)):
        _check_labels("MNIST", labels.astype(np.int64), 10, f"{root} ({split})")
    x_train, x_test = _standardize(_as_unit_float(x_train[:, None], 255), _as_unit_float(x_test[:, None], 255),
                                   channel_axis=1, preprocess=preprocess)
    return Dataset("mnist", _pair(x_train, y_train.astype(np.int64)), _pair(x_test, y_test.astype(np.int64)),
                   tuple(x_train.shape[1:]), 10, image=True, flip_ok=False,
                   source=f"MNIST IDX files in {root}" + _described(preprocess))


def _load_cifar(name: str, root: Path, preprocess: str) -> Dataset:
    from .datasets.cifar import CIFAR_LAYOUT, load_cifar

    x_train, y_train, x_test, y_test = load_cifar(name, root)
    x_train, x_test = _standardize(_as_unit_float(x_train, 255), _as_unit_float(x_test, 255), channel_axis=1,
                                   preprocess=preprocess)
    return Dataset(name, _pair(x_train, y_train), _pair(x_test, y_test), (3, 32, 32), CIFAR_LAYOUT[name]["classes"],
                   image=True, flip_ok=True, source=f"{name.upper()} python pickles in {root}" + _described(preprocess))


def load_dataset(name: str, root: str | Path | None = None, seed: int = 0, preprocess: str = "standardize") -> Dataset:
    """Load one of :data:`DATASET_NAMES`.

    ``root`` is the directory holding MNIST's IDX files or CIFAR's pickles (not needed for ``digits``
    and ``mnist1d``). ``seed`` fixes the digits split and the MNIST-1D sample; the same seed always gives
    the same data, so vary the training seed, not this one, across repeated runs. ``preprocess``:
    "standardize" (per channel, the training split's statistics) or "none" (pixels in [0, 1]).
    """
    key = dataset_name(name)
    _checks.choice(preprocess, PREPROCESS_NAMES, "preprocessing")
    if key in DATASETS_ON_DISK and root is None:
        raise HessgapError(
            f"data set {key!r} is read from files: name their directory (data_root / --data-root); "
            f"'digits' and 'mnist1d' need no files"
        )
    seed = int(seed)
    if key == "digits":
        return _load_digits(seed, preprocess)
    if key == "mnist1d":
        return _load_mnist1d(seed)
    if key == "mnist":
        return _load_mnist(Path(root), preprocess)
    return _load_cifar(key, Path(root), preprocess)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (run seed, epoch), so every epoch has its own reproducible order."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2, np.uint32)
    return int(words.view(np.uint64)[0] >> np.uint64(1))


def make_loader(
    tensor_dataset: TensorDataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    part=None,
) -> DataLoader:
    """A DataLoader over ``tensor_dataset`` whose order depends only on (seed, epoch).

    Batches are cut by indexing the tensors with a whole batch of indices at once (no per-sample
    collation), so the loader is fast and works on tensors that already live on a GPU. ``part`` maps each
    batch's indices to the part this process takes (a rank's part of the global batch in distributed
    training, :meth:`hessgap.train.parallel.Replicas.part`).
    """
    if not isinstance(tensor_dataset, TensorDataset):
        raise HessgapError(f"make_loader expects a torch.utils.data.TensorDataset, got {type(tensor_dataset).__name__}")
    size = len(tensor_dataset)
    _checks.positive_int(int(batch_size) if isinstance(batch_size, np.integer) else batch_size, "batch_size")
    if size == 0:
        raise HessgapError("the data set is empty (0 samples)")
    if batch_size > size:
        raise HessgapError(
            f"batch size {batch_size} is larger than the data set ({size} samples); use at most {size} "
            f"(the paper's large batch is 10% of the training set, here {max(1, size // 10)})"
        )
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch)) if shuffle else None
    return DataLoader(tensor_dataset, sampler=_BatchIndices(size, int(batch_size), generator, drop_last, part),
                      batch_size=None)


class _BatchIndices(Sampler):
    """Index tensors of whole batches: a permutation from ``generator`` (or 0..n−1) cut into batches.

    The order equals ``RandomSampler(generator=...)``'s; yielding tensors instead of lists of ints lets the
    dataset gather a batch in one indexing call, on the CPU or on the GPU.
    """

    def __init__(self, size: int, batch_size: int, generator: torch.Generator | None, drop_last: bool, part=None):
        self.size, self.batch_size, self.generator, self.drop_last = size, batch_size, generator, drop_last
        self.part = part

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator) if self.generator is not None \
            else torch.arange(self.size)
        for batch in order.split(self.batch_size):
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch if self.part is None else self.part(batch)

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


SMALL_BATCH = 256


def large_batch_size(dataset: Dataset | int, fraction: float = 0.1) -> int:
    """The paper's large batch: 10% of the training set (6000 for MNIST, 5000 for CIFAR)."""
    n = dataset if isinstance(dataset, int) else dataset.num_train
    return max(1, int(round(n * fraction)))
