"""The batches of one call, pass after pass: the very same data on every pass, or an error that says why not.

Sharpness solvers, Lanczos and trace estimators walk the data many times and assume every pass sees the
same function f. Three kinds of data break that silently, and :class:`DataSource` stops each of them:

- a one-shot iterator (a generator, ``iter(loader)``) is used up by the first pass: the next pass raises,
  saying to pass a list, a DataLoader or ``cache_batches=True``;
- ``max_batches`` on a loader that is not in a fixed order (a shuffled DataLoader, any other iterable)
  would give other batches on every pass: the first pass keeps the batches it read (only ``max_batches``
  of them), and later passes reuse them;
- anything else that changes between passes (random augmentation, a resampling dataset): each pass
  sums every tensor of every batch into a checksum that does not depend on the order, and a pass whose
  checksum differs from the first one's raises. A shuffled DataLoader over the whole data set keeps its
  checksum, so it works as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from ..errors import HessgapError
from .batches import is_single_batch, tensors_in, to_device

#: Relative difference of two passes' checksums that counts as other data (the sums are float64 and only
#: their order of summation may differ between passes).
CHECKSUM_TOLERANCE = 1e-9


def _fixed_order(data) -> bool:
    """Whether every pass over ``data`` gives the same batches in the same order."""
    if isinstance(data, (list, tuple)):
        return True
    if isinstance(data, DataLoader):
        sampler = getattr(data.batch_sampler, "sampler", data.sampler)
        return not isinstance(data.dataset, IterableDataset) and isinstance(sampler, SequentialSampler)
    return False


class DataSource:
    """Walks ``data`` once per pass, moving each batch to ``device`` (floating tensors cast to ``dtype``).

    ``cache=True`` keeps the moved batches of the first pass for every later one (fixed order, no loader
    cost). ``max_batches`` limits every pass to the first batches.
    """

    def __init__(self, data, *, device: torch.device, dtype: torch.dtype, max_batches: int | None = None,
                 cache: bool = False):
        if data is None:
            raise HessgapError("no data given: pass a DataLoader (or any iterable of batches) or one batch")
        self.single = is_single_batch(data)
        if not self.single and not isinstance(data, Iterable):
            raise HessgapError(
                f"data must be an iterable of batches (a DataLoader, a list) or one batch, got {type(data).__name__}"
            )
        self.data = data
        self.device, self.dtype, self.max_batches = device, dtype, max_batches
        self.one_shot = not self.single and isinstance(data, Iterator)
        fixed = self.single or _fixed_order(data)
        # the first max_batches batches of a loader not in a fixed order differ from pass to pass: keep them
        self.keep = bool(cache) or (max_batches is not None and not fixed)
        self._kept: list | None = None
        self._checksum: tuple[int, float] | None = None
        self.passes = 0

    @property
    def cached(self) -> bool:
        """Whether every pass after the first reuses the first pass's batches."""
        return self._kept is not None

    def fill(self) -> DataSource:
        """Read the batches now (``cache=True``) instead of during the first pass."""
        self.keep = True
        if self._kept is None:
            for _ in self:
                pass
        return self

    def __iter__(self) -> Iterator:
        """One pass: the batches on the device, in loader order."""
        if self._kept is not None:
            self.passes += 1
            yield from self._kept
            return
        if self.one_shot and self.passes > 0:
            raise HessgapError(
                "data is a one-shot iterator (a generator or iter(...)) and the first pass over it used it up; this "
                "call passes over the data several times: pass a list or a DataLoader instead, or cache_batches=True "
                "(or max_batches=N, which keeps the first N batches)"
            )
        kept = [] if self.keep else None
        count, total = 0, None
        source = [self.data] if self.single else self.data
        for index, raw in enumerate(source):
            if self.max_batches is not None and index >= self.max_batches:
                break
            moved = to_device(raw, self.device, self.dtype)
            if kept is not None:
                kept.append(moved)
            else:
                total = _add_checksum(total, moved)
            count += 1
            yield moved
        if count == 0:
            raise HessgapError(
                "the data yielded no batches; pass a loader with at least one batch"
                + (" (a one-shot iterator yields its batches only once)" if self.one_shot else "")
            )
        self.passes += 1
        if kept is not None:
            self._kept = kept
        else:
            self._check_same_data(count, total)

    def _check_same_data(self, count: int, total) -> None:
        checksum = (count, float(total) if total is not None else 0.0)
        if self._checksum is None:
            self._checksum = checksum
            return
        (count0, sum0), (count1, sum1) = self._checksum, checksum
        scale = max(abs(sum0), abs(sum1), 1e-300)
        if count0 != count1 or not (abs(sum0 - sum1) <= CHECKSUM_TOLERANCE * scale or math.isnan(sum0 + sum1)):
            raise HessgapError(
                f"the data changed between passes over it ({count0} batches with checksum {sum0:.12g}, then "
                f"{count1} with {sum1:.12g}): random augmentation, a resampling dataset or an iterator gives every "
                "pass another function to measure; pass cache_batches=True to fix the batches of the first pass, or "
                "a loader in a fixed order"
            )


def _add_checksum(total, batch) -> torch.Tensor | None:
    """Running float64 sum of every tensor of every batch (summed on the device: no synchronization)."""
    for t in tensors_in(batch):
        s = t.detach().sum(dtype=torch.float64)
        total = s if total is None else total + s.to(total.device)
    return total



class ResampledSource:
    """The stochastic mode's data (``resample=True``): every pass is one batch, the one :meth:`advance` last drew
    from the loader; at the end of the loader a new iterator starts (the next epoch, reshuffled by a shuffling
    DataLoader). Each product of an operator in this mode advances first, so it sees a fresh batch: the matrix
    then changes from product to product (a stochastic estimate), never within one."""

    cached = False

    def __init__(self, data, *, device: torch.device, dtype: torch.dtype):
        if data is None:
            raise HessgapError("no data given: pass a DataLoader (or any iterable of batches) or one batch")
        self.single = is_single_batch(data)
        if not self.single and not isinstance(data, Iterable):
            raise HessgapError(
                f"data must be an iterable of batches (a DataLoader, a list) or one batch, got {type(data).__name__}"
            )
        self.data, self.device, self.dtype = data, device, dtype
        self.one_shot = not self.single and isinstance(data, Iterator)
        self._iterator: Iterator | None = None
        self._current = None
        self.passes = 0
        self.draws = 0  # batches drawn so far

    def fill(self) -> ResampledSource:
        raise HessgapError("resample=True draws a fresh batch for every product; it cannot keep the batches "
                           "(cache_batches=True): use one or the other")

    def advance(self) -> None:
        """Draw the next batch."""
        if self.single:
            raw = self.data
        else:
            if self._iterator is None:
                self._iterator = iter(self.data)
            try:
                raw = next(self._iterator)
            except StopIteration:
                if self.one_shot:
                    raise HessgapError(
                        f"the one-shot iterator is used up after {self.draws} batches; resample=True draws one batch "
                        "per product: pass a DataLoader (a new epoch starts when it ends)") from None
                self._iterator = iter(self.data)
                try:
                    raw = next(self._iterator)
                except StopIteration:
                    raise HessgapError("the data yielded no batches; pass a loader with at least one batch") from None
        self._current = to_device(raw, self.device, self.dtype)
        self.draws += 1

    def __iter__(self) -> Iterator:
        """One pass: the batch drawn last (the first one when none was drawn yet)."""
        if self._current is None:
            self.advance()
        self.passes += 1
        yield self._current


def data_source(data, *, device: torch.device, dtype: torch.dtype, max_batches: int | None = None,
                cache: bool = False, resample: bool = False) -> DataSource | ResampledSource:
    """The source of an objective's batches: every batch per pass, or one fresh batch per product (``resample``)."""
    if not isinstance(resample, bool):
        raise HessgapError(f"resample must be True or False, got {resample!r}")
    if not resample:
        return DataSource(data, device=device, dtype=dtype, max_batches=max_batches, cache=cache)
    if max_batches is not None or cache:
        raise HessgapError("resample=True draws one fresh batch of the whole loader per product; it does not combine "
                           "with max_batches or cache_batches")
    return ResampledSource(data, device=device, dtype=dtype)
