"""Side by side: batched HVPs (fused and torch.func paths) against PyHessian and the double-backward loop.

All times are ratios to one gradient (forward + backward of the batch mean loss) measured in the same
run, so machine noise and machine speed cancel. Per vector of a batched HVP at k directions:

    loader mode    hessgap.hvp over L batches, k directions in one pass      / (k · L · gradient)
                   PyHessian's dataloader_hv_product (double backward per batch, per vector)
    one batch      hessgap.hvp on one batch (its forward/backward included)    / (k · gradient)
                   PyHessian's retained-graph HVP (first backward kept, only the second repeated)
                   plain torch.func: vmap over jvp(grad) (hessgap's generic path)

Models: ``mlp`` = F1 (784 → 5 × [Linear 512, BatchNorm, ReLU] → 10, 1.46M parameters) at batch 1024;
``conv`` = C1 at width 0.25 (2 × [conv 5×5, BN, ReLU, max-pool 3/2] → dense 96 → 48 → 10, 112k parameters)
on 3×32×32 inputs at batch 256. Inputs are random (the cost of an HVP does not depend on the values).

Rounds alternate the methods; the fastest round of each method counts (other jobs on a shared machine
only add time), and the gradient is timed twice per round. Run from the repository root:

    python benchmarks/hvp_ratio.py                          # CPU, both models, k = 16, 4 batches
    python benchmarks/hvp_ratio.py --threads 1 --clock process   # on a busy shared machine: CPU seconds
    python benchmarks/hvp_ratio.py --models mlp --rounds 5 --json out.json
    python benchmarks/hvp_ratio.py --device cuda --k 32     # GPU: fused vs the double-backward loop

PyHessian (``pip install pyhessian``) is a benchmark-only dependency; without it its rows are skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics

import torch
from torch import nn

from hessgap.curvature.hvp import hvp
from hessgap.train.models import build_model

import _timing


def make_case(name: str, device: torch.device, batches: int):
    torch.manual_seed(0)
    if name == "mlp":
        model, shape, batch = build_model("F1", (784,), 10), (784,), 1024
    else:
        model, shape, batch = build_model("C1", (3, 32, 32), 10, width=0.25), (3, 32, 32), 256
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(1)
    loader = [
        (torch.randn((batch,) + shape, generator=gen).to(device), torch.randint(0, 10, (batch,), generator=gen).to(device))
        for _ in range(batches)
    ]
    return model, loader


CLOCK = {"clock": _timing.Clock("wall")}


def timed(fn, device) -> float:
    """Seconds of ``fn`` on the run's clock (synchronized wall time on CUDA)."""
    return CLOCK["clock"].time(fn)


def gradient_time(model, batch, loss_fn, device) -> float:
    inputs, targets = batch

    def run():
        model.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()

    seconds = statistics.median(_timing.repeat(run, 3, CLOCK["clock"], warmup=1))
    model.zero_grad(set_to_none=True)
    return seconds


def pyhessian_loader_time(model, loader, loss_fn, vectors, device) -> float | None:
    """Seconds per vector of PyHessian's loader-mode HVP (a full double backward per batch per vector)."""
    try:
        from pyhessian import hessian as PyHessian
    except ImportError:
        return None
    engine = PyHessian(model, loss_fn, dataloader=loader, cuda=device.type == "cuda")
    params = engine.params
    per_param = [list(v.split([p.numel() for p in params])) for v in vectors]
    per_param = [[t.view_as(p) for t, p in zip(v, params)] for v in per_param]
    engine.dataloader_hv_product(per_param[0])  # warm-up
    seconds = timed(lambda: [engine.dataloader_hv_product(v) for v in per_param], device) / len(per_param)
    model.zero_grad(set_to_none=True)
    return seconds


def retained_graph_time(model, batch, loss_fn, vectors, device) -> float:
    """Seconds per vector of the retained-graph HVP (PyHessian's single-batch mode, the setup excluded)."""
    inputs, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(inputs), targets), params, create_graph=True)
    per_param = [[t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)] for v in vectors]
    torch.autograd.grad(grads, params, grad_outputs=per_param[0], retain_graph=True)  # warm-up
    seconds = timed(
        lambda: [torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True) for v in per_param], device
    )
    return seconds / len(per_param)


def double_backward_loop_time(model, batch, loss_fn, vectors, device) -> float:
    """Seconds per vector of the naive loop: forward, backward with create_graph, second backward, per vector."""
    inputs, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    per_param = [[t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)] for v in vectors]

    def one(v):
        grads = torch.autograd.grad(loss_fn(model(inputs), targets), params, create_graph=True)
        return torch.autograd.grad(grads, params, grad_outputs=v)

    one(per_param[0])
    return timed(lambda: [one(v) for v in per_param], device) / len(per_param)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="batches in the loader-mode comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-vectors", type=int, default=3,
                        help="vectors timed for the one-vector-at-a-time baselines (their cost per vector is flat)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU seconds of this process, robust to other jobs on a shared machine "
                             "(use with --threads 1 on CPU); wall: elapsed seconds (always on CUDA)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    _timing.set_threads(args.threads)
    CLOCK["clock"] = _timing.Clock(args.clock, device)  # always wall time on CUDA
    loss_fn = nn.CrossEntropyLoss()
    report = {
        "command": "python benchmarks/hvp_ratio.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "k": args.k,
        "clock": _timing.CLOCKS[CLOCK["clock"].kind].__name__,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "models": {},
    }
    for name in args.models:
        model, loader = make_case(name, device, args.batches)
        n = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(2)
        V = torch.randn(args.k, n, generator=gen).to(device)
        rounds = _timing.Rounds(clock=CLOCK["clock"].kind)  # seconds per vector per batch (gradient: per batch)
        rows, add = rounds.seconds, rounds.add

        info = hvp(model, loader[0], V[:2], return_info=True)
        print(f"[{name}] n = {n}, fused path: {info.path} {info.fallback_reason or ''}", flush=True)
        k, L = args.k, args.batches
        base = V[: args.baseline_vectors]
        for round_index in range(args.rounds):
            add("gradient", gradient_time(model, loader[0], loss_fn, device))
            if device.type == "cpu":
                add("loader_fused", timed(functools.partial(hvp, model, loader, V, path="fused"), device) / (k * L))
                t_ph = pyhessian_loader_time(model, loader, loss_fn, base, device)
                add("loader_pyhessian", None if t_ph is None else t_ph / L)
            add("gradient", gradient_time(model, loader[0], loss_fn, device))
            add("batch_fused", timed(functools.partial(hvp, model, loader[0], V, path="fused"), device) / k)
            add("batch_retained_graph", retained_graph_time(model, loader[0], loss_fn, base, device))
            add("batch_torch_func", timed(functools.partial(hvp, model, loader[0], V, path="generic"), device) / k)
            if device.type == "cuda":
                add("batch_double_backward_loop", double_backward_loop_time(model, loader[0], loss_fn, base, device))
            print(f"[{name}] round {round_index + 1} (s): " + ", ".join(f"{key}={v[-1]:.4g}" for key, v in rows.items()),
                  flush=True)
        # On a shared machine other jobs only ever add time: the fastest round of each is the least disturbed.
        best = rounds.minima()
        ratios = rounds.in_gradients("gradient", how="min")
        summary = {"n": n, "batch": loader[0][0].shape[0], "batches": L, "best_seconds": best,
                   "per_vector_over_gradient": ratios, "seconds_per_round": rows}
        comparisons = {
            "loader_fused_over_pyhessian": ("loader_fused", "loader_pyhessian"),
            "batch_fused_over_retained_graph": ("batch_fused", "batch_retained_graph"),
            "batch_fused_over_torch_func": ("batch_fused", "batch_torch_func"),
            "double_backward_loop_over_fused": ("batch_double_backward_loop", "batch_fused"),
        }
        for key, (a, b) in comparisons.items():
            if a in best and b in best:
                summary[key] = best[a] / best[b]
        report["models"][name] = summary
        print(f"[{name}] per vector, × one gradient (fastest rounds): " + ", ".join(f"{key}={v:.3g}" for key, v in ratios.items()))
        for key in comparisons:
            if key in summary:
                print(f"[{name}] {key} = {summary[key]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
