"""GPU figures of the graph engine (owed where no GPU was lent): GPT-2 at T = 1024 with k = 16, and the attention
R-op's memory against the sequence length.

1. GPT-2-small-shaped (6 layers, width 256, 4 heads, vocabulary 50257, default attention) on batches of
   sequences of 1024 tokens: one gradient against one fused ``HessianOperator.matmat`` of k = 16 vectors.
   Memory is the working set: peak allocated during the call minus what exists before it and what it returns
   (the k directions and k results of the HVP; the gradient's own result). Targets: HVP working set
   ≤ 1.3× the gradient's, time per vector ≤ 2× a gradient.
2. ``attention_rforward`` + ``attention_rbackward`` against the math twin at T = 1024 … 8192 (k = 4, 8 heads of
   64): extra peak memory beyond inputs and outputs, linear in T for the fused op, quadratic for the math one.

    python benchmarks/fused_graph_gpu.py --json gpu-graph.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import warnings

import torch

import hessgap
from hessgap.ops import attention_rop as ops

import _timing


def cuda_seconds(fn, repeats=3) -> float:
    """Median seconds of ``fn`` on the GPU (wall clock, synchronized before and after)."""
    return statistics.median(_timing.repeat(fn, repeats, _timing.Clock("wall", "cuda")))


def working_set(fn) -> tuple[int, object]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before  # what the call returns (or leaves, like .grad)
    return torch.cuda.max_memory_allocated() - before - kept, result


def gpt2_figures(args) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=256, n_head=4, vocab_size=50257, n_positions=args.seq)
    model = transformers.GPT2LMHeadModel(config).cuda().eval()
    ids = torch.randint(0, 50257, (args.batch, args.seq), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    n = sum(p.numel() for p in model.parameters())

    def gradient():
        model.zero_grad(set_to_none=False)
        model(**batch).loss.backward()

    gradient()
    grad_bytes, _ = working_set(gradient)
    grad_seconds = cuda_seconds(gradient)
    model.zero_grad(set_to_none=True)
    V = torch.randn(args.k, n, device="cuda")
    operator = hessgap.HessianOperator(model, [batch], path="fused")
    operator.matmat(V[:2])
    hvp_bytes, out = working_set(lambda: operator.matmat(V))
    del out
    hvp_seconds = cuda_seconds(lambda: operator.matmat(V)) / args.k
    return {"n": n, "seq": args.seq, "batch": args.batch, "k": args.k, "path": operator.path,
            "gradient_working_set_bytes": grad_bytes, "hvp_working_set_bytes": hvp_bytes,
            "hvp_over_gradient_memory": hvp_bytes / max(grad_bytes, 1), "gradient_seconds": grad_seconds,
            "hvp_seconds_per_vector": hvp_seconds, "hvp_per_vector_over_gradient": hvp_seconds / grad_seconds}


def _fused_rops(q, key, v, o, lse, g, rq, rk, rv, scale):
    ro, rho = ops.attention_rforward(q, key, v, None, o, lse, rq, rk, rv, True, scale)
    return ops.attention_rbackward(q, key, v, None, o, lse, g, rq, rk, rv, ro, rho, None, True, scale)


def _math_rops(q, key, v, o, lse, g, rq, rk, rv, scale):
    ro, rho = ops.attention_rforward_reference(q, key, v, None, o, lse, rq, rk, rv, True, scale)
    return ops.attention_rbackward_reference(q, key, v, None, o, lse, g, rq, rk, rv, ro, rho, None, True, scale)


def attention_figures(k=4, heads=8, head_dim=64) -> list[dict]:
    rows = []
    scale = head_dim ** -0.5
    for seq in (1024, 2048, 4096, 8192):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, key, v = (torch.randn(1, heads, seq, head_dim, device="cuda", generator=gen) for _ in range(3))
        rq, rk, rv = (torch.randn(k, 1, heads, seq, head_dim, device="cuda", generator=gen) for _ in range(3))
        o, lse = ops.attention_forward(q, key, v, None, True, scale)
        args = (q, key, v, o, lse, torch.randn_like(o), rq, rk, rv, scale)
        fused = functools.partial(_fused_rops, *args)
        row = {"seq": seq, "fused_extra_bytes": working_set(fused)[0], "fused_seconds": cuda_seconds(fused, 2)}
        try:
            row["math_extra_bytes"] = working_set(functools.partial(_math_rops, *args))[0]
        except torch.cuda.OutOfMemoryError:
            row["math_extra_bytes"] = "out of memory"
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gpt2": gpt2_figures(args)}
    print(json.dumps(report["gpt2"], indent=2), flush=True)
    report["attention"] = attention_figures()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
