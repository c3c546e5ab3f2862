"""Curvature of a ≥ 0.5B-parameter decoder in bfloat16: top eigenvalue and Hutchinson trace, wall time, memory.

A Llama-shaped decoder (RMSNorm, rotary positions, SwiGLU, causal attention) built from a transformers config
with a seeded random init, in bfloat16, on a short batch of random token ids (labels = the ids, Hugging Face's
own loss in float32). Products run on the graph engine in bfloat16, sums and vectors in float32.

    python benchmarks/llm_scale.py                          # 0.55B on the CPU (about 20 min on 2 cores)
    python benchmarks/llm_scale.py --device cuda --size 7b  # Llama-2-7B's shape on a GPU

Memory: every vector of the spectrum calls is float32 over all n parameters (2.2 GB at 0.55B, 27 GB at 7B).
λmax runs block Lanczos with ``max_basis=3`` (the smallest basis for k = 1: 3 vectors and their 3 products),
the trace one Rademacher probe per product; one product holds its direction in bfloat16 and a float32 sum.
The script prints that estimate first and stops when it exceeds the device's memory.

Peak memory is the process's resident set (VmHWM, reset before each phase) on the CPU, and
``max_memory_allocated`` on CUDA; both are compared with the model's own gradient (one backward) on the
same batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import _timing

SIZES = {
    # hidden, intermediate, layers, heads, vocab: 0.55B (untied embeddings), a smoke-test size, Llama-2-7B
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                 vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               vocab_size=32000),
}
MAX_BASIS = 3


def build(size: str, device: torch.device, seed: int):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(**SIZES[size], num_key_value_heads=SIZES[size]["num_attention_heads"],
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):  # built where it runs, in bfloat16: a float32 7B would not fit first
        model = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16)
    return model.eval()


def batch_of(vocab: int, rows: int, tokens: int, device: torch.device, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, tokens), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


class Peak:
    """Peak memory of a phase: resident set on the CPU, allocated bytes on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _timing.reset_peak_resident()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = _timing.peak_resident_bytes()
        self.seconds = time.perf_counter() - self.started
        return False


def check_memory(n: int, device: torch.device, power: bool) -> float:
    """The estimate of the spectrum calls' peak (GB), refused when it cannot fit the device."""
    held = 2 if power else 2 * MAX_BASIS  # float32 vectors kept: v and H·v, or the basis and its products
    vectors = (held + 1) * 4 * n + 2 * n  # + one float32 sum and a bfloat16 direction in the product
    estimate = (vectors + 2 * n) / 1e9  # + the bfloat16 model
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory / 1e9
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    print(f"memory estimate {estimate:.1f} GB for {n / 1e9:.2f}B parameters; the device has {available:.1f} GB")
    if estimate > available:
        sys.exit(f"the float32 vectors need about {estimate:.0f} GB, more than the {available:.0f} GB here")
    return estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--tol", type=float, default=1e-2, help="λmax's relative tolerance (Ritz residual bound)")
    parser.add_argument("--criterion", choices=["residual", "eigenvalue"], default="residual",
                        help="accept λmax on its Ritz residual bound, or on Kato–Temple's estimate (fewer steps)")
    parser.add_argument("--max-iter", type=int, default=40)
    parser.add_argument("--power", action="store_true",
                        help="the eigenvalue of largest magnitude by the power method on two vectors, where "
                             "Lanczos's basis does not fit")
    parser.add_argument("--probes", type=int, default=8, help="Hutchinson probes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        _timing.set_threads(args.threads)
    model = build(args.size, device, args.seed)
    n = sum(p.numel() for p in model.parameters())
    batch = batch_of(model.config.vocab_size, args.rows, args.tokens, device, args.seed)
    estimate = check_memory(n, device, args.power)
    out = {"size": args.size, "parameters": n, "tokens": args.rows * args.tokens, "dtype": "bfloat16",
           "device": str(device), "memory_estimate_gb": round(estimate, 1), "machine": _timing.machine(device)}

    with Peak(device) as grad_peak:
        loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    loss = float(loss.detach())
    out["loss"] = loss
    out["gradient"] = {"seconds": grad_peak.seconds, "peak_gb": grad_peak.bytes / 1e9}
    print(f"{n / 1e9:.3f}B parameters, loss {loss:.4f}, gradient {grad_peak.seconds:.1f} s, "
          f"peak {grad_peak.bytes / 1e9:.2f} GB", flush=True)


    if args.power:
        with Peak(device) as peak:
            lam, bound, products = power_iteration(model, batch, args.max_iter, args.tol, args.seed)
        out["lambda_largest_magnitude"] = {"value": lam, "residual_bound": bound, "relative_bound": bound / abs(lam),
                                           "converged": bound <= args.tol * abs(lam), "products": products,
                                           "seconds": peak.seconds, "peak_gb": peak.bytes / 1e9}
        save(out, args.json)
        print(f"largest |λ| (power method) {lam:.5g} ± {bound:.2g}, {products} products, {peak.seconds:.0f} s, "
              f"peak {peak.bytes / 1e9:.2f} GB", flush=True)
    else:
        lanczos(model, batch, args, device, out)
    trace_of(model, batch, args, device, out)
    save(out, args.json)


def power_iteration(model, batch, steps: int, tol: float, seed: int) -> tuple[float, float, int]:
    """The eigenvalue of largest magnitude (not λmax when a negative one is larger: the power method converges
    to it) on two float32 vectors (v and H·v): the Rayleigh quotient θ and its residual
    ‖H·v − θ·v‖ = √(‖H·v‖² − θ²), a bound on the distance to the nearest eigenvalue; for a basis that does
    not fit (Lanczos keeps 2·max_basis vectors)."""
    import hessgap

    operator = hessgap.HessianOperator(model, [batch])
    gen = torch.Generator(device=operator.device).manual_seed(seed)
    v = torch.randn(1, operator.n, generator=gen, device=operator.device, dtype=operator.dtype)
    v /= v.norm()
    theta, bound = math.nan, math.inf
    for step in range(1, steps + 1):
        hv = operator.matmat(v)
        theta = float((hv.double() * v.double()).sum()) if v.numel() < 2**27 else float(torch.vdot(hv[0], v[0]))
        size = float(hv.norm())
        bound = math.sqrt(max(size * size - theta * theta, 0.0))
        print(f"  power step {step}: θ {theta:.5g}, residual {bound:.2g}", flush=True)
        if bound <= tol * abs(theta):
            break
        v = hv.div_(size)
        del hv
    return theta, bound, step


def lanczos(model, batch, args, device, out) -> None:
    import hessgap

    with Peak(device) as peak:
        top = hessgap.eigenvalues(model, [batch], k=1, tol=args.tol, criterion=args.criterion, max_basis=MAX_BASIS,
                                  max_iter=args.max_iter, progress=True)
    lam, bound = top.eigenvalues[0], top.residuals[0]
    out["lambda_max"] = {"value": lam, "residual_bound": bound, "relative_bound": bound / abs(lam),
                         "converged": top.converged, "products": top.hvps, "iterations": top.iterations,
                         "path": top.path, "seconds": peak.seconds, "peak_gb": peak.bytes / 1e9}
    save(out, args.json)
    print(f"λmax {lam:.5g} ± {bound:.2g} ({bound / abs(lam):.1e} relative), converged {top.converged}, "
          f"{top.hvps} products, path {top.path}, {peak.seconds:.0f} s, peak {peak.bytes / 1e9:.2f} GB", flush=True)


def trace_of(model, batch, args, device, out) -> None:
    import hessgap

    with Peak(device) as peak:
        tr = hessgap.trace(model, [batch], num_probes=args.probes, batch=1, progress=True)
    out["trace"] = {"value": tr.value, "ci": list(tr.ci), "stderr": tr.stderr, "probes": args.probes,
                    "seconds": peak.seconds, "peak_gb": peak.bytes / 1e9}
    print(f"trace {tr.value:.5g}, 95 % interval [{tr.ci[0]:.5g}, {tr.ci[1]:.5g}], {args.probes} products, "
          f"{peak.seconds:.0f} s, peak {peak.bytes / 1e9:.2f} GB", flush=True)
    out["product_seconds"] = out["trace"]["seconds"] / args.probes


def save(out: dict, path: str | None) -> None:
    """Write what has been measured so far (each phase as it ends: a long run stopped early keeps its first)."""
    if path:
        with open(path, "w") as handle:
            json.dump(out, handle, indent=2, default=lambda v: v if math.isfinite(v) else str(v))


if __name__ == "__main__":
    main()
