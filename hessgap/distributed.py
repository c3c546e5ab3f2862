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
  a cheap gather of a small description, before any real work; ranks that hold different weights, by
  :meth:`Ranks.agree_on_values`, which gathers one exact fingerprint per tensor (:func:`fingerprints`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import HessgapError

#: Fingerprints are sums of 16-bit words times position weights, modulo this prime (2³¹ − 1).
FINGERPRINT_PRIME = 2**31 - 1
_PERIOD = 1 << 29  # position weights run 1..2²⁹: a word (< 2¹⁵ in size) times a weight is exact in float64
_ROW = 1 << 8  # words summed exactly in float64 before the integer reduction: 2⁸ · 2¹⁵ · 2²⁹ = 2⁵² < 2⁵³
# words per step (a multiple of _ROW that divides _PERIOD), in buffers reused from step to step: fresh large
# temporaries cost page faults, which made the fingerprint 3-5 times slower on CPU
_CHUNK = 1 << 18


def fingerprints(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One integer per tensor that changes when any of its values changes, bit for bit (an int64 tensor).

    Σ_i u_i·w_i mod p over the tensor's bytes read as signed 16-bit words u_i (8-bit for 1-byte dtypes), with
    w_i = (i mod 2²⁹) + 1 and p = 2³¹ − 1. Every partial sum is an integer below 2⁵³ before it is reduced mod
    p, so the result does not depend on the order of summation: equal tensors give equal fingerprints on any
    device and thread count, and ranks can compare them exactly (a float tolerance would pass a small
    perturbation, and sums of x and x² pass two swapped elements). A changed word always changes the
    fingerprint (|Δ·w_i| < p² and p is prime), and so do two swapped words less than 2²⁹ words apart (their
    weights differ); several changes cancel with probability about 1/p. About 5 ns per float32 parameter on
    one CPU thread.
    """
    device = tensors[0].device if tensors else torch.device("cpu")
    out = torch.zeros(len(tensors), dtype=torch.int64, device=device)
    for index, tensor in enumerate(tensors):
        flat = tensor.detach().contiguous().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        words = flat.view(torch.int8 if flat.element_size() == 1 else torch.int16)
        steps = min(_CHUNK, words.numel())
        positions = torch.arange(1, steps + 1, dtype=torch.float64, device=flat.device)
        terms, weights = torch.empty_like(positions), torch.empty_like(positions)
        total = torch.zeros((), dtype=torch.int64, device=flat.device)
        for start in range(0, words.numel(), _CHUNK):
            chunk = words[start : start + _CHUNK]
            n, whole = chunk.numel(), chunk.numel() // _ROW * _ROW
            torch.add(positions[:n], start % _PERIOD, out=weights[:n])
            products = terms[:n].copy_(chunk).mul_(weights[:n])
            sums = torch.cat([products[:whole].view(-1, _ROW).sum(1), products[whole:].sum().reshape(1)])
            total = (total + sums.to(torch.int64).remainder(FINGERPRINT_PRIME).sum()) % FINGERPRINT_PRIME
        out[index] = total.to(device)
    return out


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
        """Raise on every rank unless all ranks pass an equal ``value`` (a small picklable description).

        When the values are dicts (argument name → value), the error names only the entries that differ."""
        if not self.active:
            return
        values = self.gather_object(value)
        if all(v == values[0] for v in values[1:]):
            return
        if all(isinstance(v, dict) for v in values):
            keys = [k for k in dict.fromkeys(k for v in values for k in v) if any(v.get(k) != values[0].get(k)
                                                                                 for v in values[1:])]
            listing = "; ".join(f"{k}: " + ", ".join(f"rank {r}: {v.get(k)!r}" for r, v in enumerate(values))
                                for k in keys)
        else:
            listing = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise HessgapError(
            f"the ranks disagree on {what} ({listing[:2000]}); every rank must call hessgap with the same "
            "model and arguments, each with its own shard of the data"
        )

    def agree_on_model(self, what: str, model, arguments: tuple = ()) -> None:
        """Raise on every rank unless all ranks pass equal ``arguments`` (``what`` names them) with the same
        model: the same parameters and buffers (names, shapes, dtypes) holding the same values, bit for bit
        (:meth:`agree_on_values`). DTensor shards (FSDP2), which differ by design, are left out."""
        if not self.active:
            return
        from torch.distributed.tensor import DTensor

        tensors = [(f"parameter {n}", t) for n, t in model.named_parameters()]
        tensors += [(f"buffer {n}", t) for n, t in model.named_buffers()]
        tensors = [(n, t) for n, t in tensors if not isinstance(t, DTensor)]
        layout = hashlib.sha256(";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in tensors).encode()).hexdigest()
        self.agree(what, (*arguments, f"{len(tensors)} parameters and buffers, layout {layout[:12]}"))
        self.agree_on_values(tensors)

    def agree_on_values(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Raise on every rank, naming the first differing tensor, unless all ranks hold the same values in each
        of the ``(name, tensor)`` pairs (bit for bit, by :func:`fingerprints`; one all-gather of one integer per
        tensor). The ranks must already agree on the names, shapes and dtypes (:meth:`agree`)."""
        if not self.active or not named:
            return
        local = fingerprints([t for _, t in named]).to(self._device(named[0][1].device))
        every = torch.stack(self.gather(local)).cpu()  # (ranks, tensors)
        differs = (every != every[0]).any(0).nonzero().flatten().tolist()
        if not differs:
            return
        first = differs[0]
        others = [r for r in range(self.world_size) if every[r, first] != every[0, first]]
        more = f" and {len(differs) - 1} more" if len(differs) > 1 else ""
        which = f"rank {others[0]} differs" if len(others) == 1 else f"ranks {', '.join(map(str, others))} differ"
        raise HessgapError(
            f"the ranks hold different values in {named[first][0]}{more} ({which} from rank 0): every rank must hold "
            "the same model, or each would measure another function. Load the same checkpoint on every rank, or "
            "broadcast rank 0's weights (torch.distributed.broadcast of each parameter and buffer, src=0), and seed "
            "the initialization alike on every rank"
        )

    def describe(self) -> dict:
        """What :mod:`hessgap.info` and results report about the ranks."""
        return {"distributed": self.active, "backend": self.backend, "world_size": self.world_size, "rank": self.rank}
