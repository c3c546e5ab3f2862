"""The random subspace of Metric 2.1: A ∈ R^{n×p} applied, transposed and pseudo-inverted without holding it.

A has i.i.d. N(0, 1) entries (Keskar et al. do not say which distribution they used; ``scale="sqrt_n"``
gives N(0, 1/n) instead, so that the columns have unit expected norm). Its rows are cut into fixed blocks
of :data:`BLOCK_ROWS` rows; block ``b`` is drawn from its own generator seeded by ``(seed, b)``, so any
block can be regenerated on demand and the same seed, device and dtype always give the same A, whether
it is regenerated block by block or held in memory (which happens only when it fits ``memory_bytes``).

The n coordinates are those of the model's trainable parameters concatenated in ``parameters()`` order.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import torch

from .._memory import available_bytes
from ..errors import HessgapError

BLOCK_ROWS = 32768
#: Without ``memory_bytes``, A is held when it takes at most this share of the device's free memory:
#: regenerating it costs about 3 s per product for a 5M-parameter model at p = 100 on one CPU core,
#: 3-4x the loss and gradient it serves, against one generation when held.
HOLD_SHARE = 0.25
#: ... and the budget where the free memory is unknown.
FALLBACK_BYTES = 2**28
SCALES = ("unit", "sqrt_n")


def _block_seed(seed: int, block: int) -> int:
    # a fixed mixing of (seed, block) into one 63-bit generator seed
    return (seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63 - 1)


class FlatParameters:
    """The concatenation of several tensors seen as one vector, read and written block by block."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)
        self.offsets, self.sizes = [], []
        total = 0
        for t in self.tensors:
            self.offsets.append(total)
            self.sizes.append(t.numel())
            total += t.numel()
        self.numel = total

    def segments(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor, int, int]]:
        """``(tensor index, tensor, begin, end)``: the parts of tensors covering flat range [start, stop)."""
        # from the last tensor starting at or before ``start``: a walk from the first tensor at every
        # block cost seconds per call on models with hundreds of parameter tensors
        for index in range(max(0, bisect.bisect_right(self.offsets, start) - 1), len(self.tensors)):
            t, offset = self.tensors[index], self.offsets[index]
            if offset >= stop:
                break
            begin, end = max(start, offset), min(stop, offset + self.sizes[index])
            if begin < end:
                yield index, t, begin - offset, end - offset

    def read(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        parts = [t.reshape(-1)[a:b] for _, t, a, b in self.segments(start, stop)]
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out.to(dtype) if dtype is not None else out


class RandomSubspace:
    """A ∈ R^{n×p} with i.i.d. Gaussian entries, regenerated from ``seed`` block by block.

    ``memory_bytes``: A is kept in memory when its n·p entries fit in this many bytes (faster, same
    numbers); otherwise every product regenerates it, so the extra memory is one block of
    ``BLOCK_ROWS × p`` entries. None (default): a quarter of what the device has free (``held`` says
    which was chosen).
    """

    def __init__(
        self,
        n: int,
        p: int,
        seed: int = 0,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        scale: str = "unit",
        memory_bytes: int | None = None,
    ):
        if isinstance(p, bool) or not isinstance(p, int):
            raise HessgapError(f"subspace_dim must be an integer number of directions, got {p!r}")
        if p <= 0 or p > n:
            raise HessgapError(
                f"subspace_dim must be between 1 and the number of trainable parameters ({n}), got {p}; "
                "use subspace_dim=None for the full space"
            )
        if scale not in SCALES:
            raise HessgapError(f"subspace scale must be one of {SCALES}, got {scale!r}")
        self.n, self.p, self.seed = n, p, int(seed)
        self.device, self.dtype = torch.device(device), dtype
        self.scale = scale
        self.num_blocks = (n + BLOCK_ROWS - 1) // BLOCK_ROWS
        entry_bytes = torch.empty((), dtype=dtype).element_size()
        if memory_bytes is None:
            free = available_bytes(self.device)
            memory_bytes = FALLBACK_BYTES if free is None else int(HOLD_SHARE * free)
        self.held = n * p * entry_bytes <= memory_bytes
        self._matrix = None
        if self.held:  # each block generated straight into its rows: no second copy of A, even briefly
            self._matrix = torch.empty((n, p), device=self.device, dtype=dtype)
            for b in range(self.num_blocks):
                self._generate(b, out=self._matrix[b * BLOCK_ROWS : (b + 1) * BLOCK_ROWS])

    def _generate(self, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = min(BLOCK_ROWS, self.n - block * BLOCK_ROWS)
        generator = torch.Generator(device=self.device).manual_seed(_block_seed(self.seed, block))
        a = torch.randn((rows, self.p), generator=generator, device=self.device, dtype=self.dtype, out=out)
        if self.scale == "sqrt_n":
            a.mul_(self.n**-0.5)
        return a

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, A[start:stop])`` for every row block, in order."""
        for b in range(self.num_blocks):
            start, stop = b * BLOCK_ROWS, min(self.n, (b + 1) * BLOCK_ROWS)
            block = self._matrix[start:stop] if self._matrix is not None else self._generate(b)
            yield start, stop, block

    def matrix(self) -> torch.Tensor:
        """The whole n × p matrix (for tests and small models; regenerates it when not held)."""
        return self._matrix if self._matrix is not None else torch.cat([blk for _, _, blk in self.blocks()])

    @torch.no_grad()
    def gram_and_project(self, x: FlatParameters) -> tuple[torch.Tensor, torch.Tensor]:
        """AᵀA (p × p) and Aᵀx (p), in float64, in one pass over A."""
        gram = torch.zeros((self.p, self.p), dtype=torch.float64, device=self.device)
        atx = torch.zeros(self.p, dtype=torch.float64, device=self.device)
        chunk = 4096  # float64 copies of a few rows at a time, not of the whole block
        for start, stop, block in self.blocks():
            for r in range(0, stop - start, chunk):
                rows = block[r : r + chunk].double()
                gram.addmm_(rows.T, rows)
                atx.addmv_(rows.T, x.read(start + r, min(stop, start + r + chunk), torch.float64))
        return gram, atx

    @torch.no_grad()
    def pinv_apply(self, x: FlatParameters) -> torch.Tensor:
        """A⁺x = (AᵀA)⁻¹ Aᵀx (A has full column rank with probability one since p ≤ n), float64.

        On CPU the SVD-based driver ``gelsd``: torch's default there, ``gelsy``, gave results that differ in
        the last bits from one call to the next on the same input, so two equal sharpness calls could
        disagree. CUDA has only ``gels``.
        """
        gram, atx = self.gram_and_project(x)
        driver = "gelsd" if gram.device.type == "cpu" else None
        return torch.linalg.lstsq(gram, atx.unsqueeze(1), driver=driver).solution.squeeze(1)

    @torch.no_grad()
    def rmatvec(self, g: FlatParameters) -> torch.Tensor:
        """Aᵀg (p), accumulated in float64."""
        out = torch.zeros(self.p, dtype=torch.float64, device=self.device)
        for start, stop, block in self.blocks():
            out.add_((block.T @ g.read(start, stop, block.dtype)).double())
        return out

    @torch.no_grad()
    def write_shifted(self, x: FlatParameters, z: torch.Tensor, out: FlatParameters) -> None:
        """out ← x + A z, block by block (out and x are the same layout; out may be the model's weights)."""
        z = z.to(self.dtype)
        for start, stop, block in self.blocks():
            shift = block @ z
            for (i, target, a, b), (_, centre, c, d) in zip(out.segments(start, stop), x.segments(start, stop)):
                piece = shift[out.offsets[i] + a - start : out.offsets[i] + b - start]
                value = centre.reshape(-1)[c:d] + piece
                if target.is_contiguous():
                    target.view(-1)[a:b].copy_(value)
                else:  # a non-contiguous parameter: write through a contiguous copy
                    tmp = target.contiguous().view(-1)
                    tmp[a:b].copy_(value)
                    target.copy_(tmp.view_as(target))
