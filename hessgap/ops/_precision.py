"""Half-precision tensors through the compiled kernels, which take float32 and float64 only.

A bfloat16 or float16 model's products run in its own dtype (its GEMMs, its element-wise ops); the fused
kernels are the reductions of the R-passes (row sums of norms, softmax statistics, attention's log-sum-exp),
so they run in float32 on float32 copies of their arguments and hand their results back in the model's
dtype. Row statistics that later kernels read again (attention's log-sum-exp and ρ, a norm's m1) stay in
float32: rounded to bfloat16 (3 significant digits), a log-sum-exp of 10 moves every probability by ~2 %.
"""

from __future__ import annotations

import torch

REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def reduced_dtype(*args) -> torch.dtype | None:
    """The first bfloat16/float16 dtype among the tensor arguments, or None."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.dtype in REDUCED_PRECISION:
            return a.dtype
    return None


def in_float32(op, *args, keep: tuple[int, ...] = ()):
    """``op(*args)``, with half-precision tensor arguments run in float32 and the results cast back to that
    dtype, except the results at the indices in ``keep`` (row statistics), which stay float32. Arguments
    without a half-precision tensor go to ``op`` as they are."""
    dtype = reduced_dtype(*args)
    if dtype is None:
        return op(*args)
    wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype in REDUCED_PRECISION else a for a in args]
    out = op(*wide)
    if isinstance(out, torch.Tensor):
        return out.to(dtype)
    return type(out)(o if i in keep or not isinstance(o, torch.Tensor) else o.to(dtype) for i, o in enumerate(out))
