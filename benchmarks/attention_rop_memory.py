"""Working set of the attention R-op on CPU against the sequence length: hessgap's fused kernel against the
same R-backward written with plain PyTorch ops (math attention, which forms (k, B, H, T, T) matrices).

Peak bytes allocated during one tangent backward (``attention_rbackward``, k directions), read from the
profiler's allocation events; the primal and tangent inputs are allocated before and not counted. Causal
attention, float32. On a GPU, ``benchmarks/fused_graph_gpu.py`` measures the same with CUDA's allocator.

    python benchmarks/attention_rop_memory.py [--k 2] [--heads 2] [--dim 64] [--lengths 256,512,1024,2048]
"""

from __future__ import annotations

import argparse
import json

import torch

from hessgap.ops import attention_rop as ops

import _timing


def peak_allocated_bytes(fn) -> int:
    """The largest sum of live allocations while ``fn`` runs (CPU allocator events, in time order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(T: int, k: int, heads: int, dim: int) -> dict:
    gen = torch.Generator().manual_seed(T)
    q, key, v = (torch.randn(1, heads, T, dim, generator=gen) for _ in range(3))
    rq, rk, rv = (torch.randn(k, 1, heads, T, dim, generator=gen) for _ in range(3))
    scale = dim**-0.5
    o, lse = ops.attention_forward(q, key, v, None, True, scale)
    g = torch.randn_like(o)
    ro, rho = ops.attention_rforward(q, key, v, None, o, lse, rq, rk, rv, True, scale)
    args = (q, key, v, None, o, lse, g, rq, rk, rv, ro, rho, None, True, scale)
    fused = peak_allocated_bytes(lambda: ops.attention_rbackward(*args))
    math = peak_allocated_bytes(lambda: ops.attention_rbackward_reference(*args))
    outputs = 3 * k * heads * T * dim * 4  # R{dQ}, R{dK}, R{dV}: what any implementation must return
    return {"T": T, "fused_bytes": fused, "math_bytes": math, "outputs_bytes": outputs,
            "fused_over_outputs": fused / outputs, "math_over_fused": math / max(fused, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lengths", default="256,512,1024,2048")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    _timing.set_threads(1)
    rows = [measure(int(T), args.k, args.heads, args.dim) for T in args.lengths.split(",")]
    print(f"attention R-backward, causal, float32, k = {args.k}, B = 1, H = {args.heads}, D = {args.dim}")
    print(f"{'T':>6} {'fused MiB':>10} {'math MiB':>10} {'outputs MiB':>12} {'fused/outputs':>14} {'math/fused':>11}")
    for r in rows:
        print(f"{r['T']:>6} {r['fused_bytes'] / 2**20:>10.2f} {r['math_bytes'] / 2**20:>10.2f} "
              f"{r['outputs_bytes'] / 2**20:>12.2f} {r['fused_over_outputs']:>14.2f} "
              f"{r['math_over_fused']:>11.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
