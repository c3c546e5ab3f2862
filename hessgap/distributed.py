"""Data-parallel measurement on torch.distributed: which ranks take part, sums across them, and agreement.

When a default process group is initialized (``torchrun``, ``torch.distributed.init_process_group``) or a
``group`` is passed, every public call treats the data as the union of the ranks' loaders: each rank walks
its own shard, and the per-rank sums (of weighted losses, gradients, Hessian-vector products) are added up
with one all-reduce per pass. Every rank then holds the same numbers and takes the same solver steps.

Two rules keep a distributed call from hanging or diverging silently:

- a rank that fails (bad batch, non-finite loss, empty shard) does not leave the others waiting in a
  collective: :meth:`Ranks.settle` is itself a collective that tells every rank whether any failed, and all
  of them raise;
- ranks that disagree on what they are computing (model shapes, arguments) are found by :meth:`Ranks.agree`,
  a cheap gather of a small description, before any real work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import HessgapError


def _dist():
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class Ranks:
    """The ranks of one call: ``group`` is None in a single process (every method is then a no-op)."""

    group: object | None = None
    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @classmethod
    def resolve(cls, group=None) -> Ranks:
        """The given ``group``, else the default process group when one is initialized, else one process."""
        available = torch.distributed.is_available()
        initialized = available and _dist().is_initialized()
        if group is None:
            if not initialized:
                return cls()
            group = _dist().group.WORLD
        elif not initialized:
            raise HessgapError(
                "group= was given but torch.distributed has no initialized process group; call "
                "torch.distributed.init_process_group(...) first (torchrun sets up the environment for it)"
            )
        dist = _dist()
        return cls(group=group, rank=dist.get_rank(group), world_size=dist.get_world_size(group),
                   backend=str(dist.get_backend(group)))

    @property
    def active(self) -> bool:
        return self.group is not None

    def _device(self, like: torch.device | None = None) -> torch.device:
        """Where small control tensors live: NCCL reduces CUDA tensors only, gloo CPU tensors."""
        if self.backend == "nccl":
            return like if like is not None and like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Add ``tensor`` up across the ranks, in place."""
        if self.active:
            if self.backend == "gloo" and tensor.device.type != "cpu":
                host = tensor.cpu()
                _dist().all_reduce(host, group=self.group)
                tensor.copy_(host)
            else:
                _dist().all_reduce(tensor, group=self.group)
        return tensor

    def sum_bucket_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Add several tensors up across the ranks in place with one all-reduce (one flat bucket per dtype)."""
        if not self.active or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self.sum_(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        if not self.active:
            return [tensor]
        host = tensor.cpu() if self.backend == "gloo" else tensor
        parts = [torch.empty_like(host) for _ in range(self.world_size)]
        _dist().all_gather(parts, host.contiguous(), group=self.group)
        return [part.to(tensor.device) for part in parts]

    def sum_numbers(self, values: Sequence[float]) -> list[float]:
        """Plain numbers added up across the ranks (float64, one all-reduce)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        return self.sum_(t).tolist()

    def settle(self, error: Exception | None) -> None:
        """A collective every rank must reach: raises on every rank when any rank passes an error.

        The rank that failed re-raises its own error; the others raise a :class:`HessgapError` naming it.
        """
        if not self.active:
            if error is not None:
                raise error
            return
        flags = torch.zeros(self.world_size, dtype=torch.float64, device=self._device())
        if error is not None:
            flags[self.rank] = 1.0
        self.sum_(flags)
        failed = [r for r, f in enumerate(flags.tolist()) if f > 0]
        if not failed:
            return
        if error is not None:
            raise error
        raise HessgapError(
            f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of {self.world_size} failed "
            "during this call (its own error says why); every rank stops here instead of waiting for it"
        )

    def together(self, step, *args, **kwargs):
        """Run a local ``step`` that may fail on some ranks only (reading a shard, checking weights) and
        return its value; when any rank's step raised, every rank raises (see :meth:`settle`)."""
        error, value = None, None
        try:
            value = step(*args, **kwargs)
        except Exception as exc:  # every rank must reach the collective in settle, also the one that failed
            error = exc
        self.settle(error)
        return value

    def gather_object(self, value) -> list:
        """Every rank's ``value`` (a small picklable object), in rank order."""
        if not self.active:
            return [value]
        values: list = [None] * self.world_size
        _dist().all_gather_object(values, value, group=self.group)
        return values

    def agree(self, what: str, value) -> None:
        """Raise on every rank unless all ranks pass an equal ``value`` (a small picklable description)."""
        if not self.active:
            return
        values = self.gather_object(value)
        if any(v != values[0] for v in values[1:]):
            listing = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise HessgapError(
                f"the ranks disagree on {what} ({listing[:2000]}); every rank must call hessgap with the same "
                "model and arguments, each with its own shard of the data"
            )

    def describe(self) -> dict:
        """What :mod:`hessgap.info` and results report about the ranks."""
        return {"distributed": self.active, "backend": self.backend, "world_size": self.world_size, "rank": self.rank}
