"""Side by side: the graph engine's fused HVP on real architectures against a retained-graph double backward
(PyHessian's best mode) and curvlinops' HessianLinearOperator matmat, per vector, in gradients.

Models (Hugging Face transformers, random weights, built from configs; eval mode):

    resnet   ResNet-18-shaped for CIFAR: basic blocks [2, 2, 2, 2], widths 64-128-256-512, 3×32×32 inputs
    gpt2     GPT-2-small-shaped: 6 layers, width 256, 4 heads, GPT-2's vocabulary (50257), sequences of 128,
             default attention (sdpa); next-token cross-entropy on the logits

Per vector of one batch, as a multiple of one gradient (forward + backward of the batch loss, default kernels):

    fused            hessgap.HessianOperator(model, batch).matmat(V), k vectors at once, the primal forward and
                     backward of every call included (the capture is done once, before timing)
    retained_graph   ∇L built once with create_graph (not timed), then one autograd.grad per vector
    curvlinops       curvlinops.HessianLinearOperator(...) @ V (vmap over jvp(jacrev)), k vectors at once
    generic          hessgap's generic path (batched double backward through one retained graph)

The second-order baselines run attention on PyTorch's math kernels (its fused CPU attention has no double
backward and no forward-mode rule). Rounds alternate the methods; the fastest round of each counts. Run from
the repository root:

    python benchmarks/fused_graph_ratio.py --threads 1 --clock process
    python benchmarks/fused_graph_ratio.py --models gpt2 --k 16 --rounds 2 --json out.json
    python benchmarks/fused_graph_ratio.py --profile gpt2      # where the fused path's time goes

curvlinops (``pip install torch==2.13.0 curvlinops-for-pytorch``) is a benchmark-only dependency; without it its
row is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import warnings

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessgap

import _timing

CLOCK = {"clock": _timing.Clock("wall")}


class LanguageModel(nn.Module):
    """A causal LM's logits shifted for next-token prediction, classes second: (B, vocab, T−1)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits[:, :-1].transpose(1, 2)


class ImageClassifier(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def make_case(name: str, args):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "resnet":
        config = transformers.ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                           depths=[2, 2, 2, 2], layer_type="basic", num_labels=10)
        model = ImageClassifier(transformers.ResNetForImageClassification(config))
        batch = (torch.randn(args.image_batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (args.image_batch,), generator=gen))
    else:
        config = transformers.GPT2Config(n_layer=args.layers, n_embd=256, n_head=4, vocab_size=args.vocab,
                                         n_positions=args.seq)
        model = LanguageModel(transformers.GPT2LMHeadModel(config))
        ids = torch.randint(0, args.vocab, (args.text_batch, args.seq), generator=gen)
        batch = (ids, ids[:, 1:])
    return model.eval(), batch


def gradient_time(model, batch, loss_fn) -> float:
    x, y = batch

    def run():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    seconds = min(_timing.repeat(run, 2, CLOCK["clock"], warmup=1))
    model.zero_grad(set_to_none=True)
    return seconds


def per_parameter(params, v):
    return [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]


def retained_graph_time(model, batch, loss_fn, vectors) -> float:
    x, y = batch
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        vs = [per_parameter(params, v) for v in vectors]
        torch.autograd.grad(grads, params, grad_outputs=vs[0], retain_graph=True)  # warm-up
        seconds = CLOCK["clock"].time(lambda: [torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True) for v in vs])
    return seconds / len(vectors)


def curvlinops_time(model, batch, loss_fn, vectors, block: int) -> float | None:
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel([SDPBackend.MATH]):
        operator = HessianLinearOperator(model, loss_fn, params, [batch], check_deterministic=False)
        V = vectors.T.contiguous()
        operator @ V[:, :1]  # warm-up
        # its matmat vmaps over all columns at once: blocks of columns keep its memory within the machine
        seconds = CLOCK["clock"].time(lambda: [operator @ V[:, i : i + block] for i in range(0, V.shape[1], block)])
    return seconds / vectors.shape[0]


def generic_time(model, batch, loss_fn, vectors) -> float:
    return CLOCK["clock"].time(lambda: hessgap.hvp(model, [batch], vectors, loss_fn=loss_fn, path="generic")) / vectors.shape[0]


def fused_time(operator, vectors) -> float:
    return CLOCK["clock"].time(lambda: operator.matmat(vectors)) / vectors.shape[0]


def profile(model, batch, vectors, rows=25):
    operator = hessgap.HessianOperator(model, [batch], loss_fn=nn.CrossEntropyLoss(), path="fused")
    operator.matmat(vectors[:2])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        operator.matmat(vectors)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet", "gpt2"], choices=["resnet", "gpt2"])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-vectors", type=int, default=3,
                        help="vectors timed for the retained-graph baseline (its cost per vector is flat)")
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk-size", type=int, default=None, help="directions per chunk of the fused path")
    parser.add_argument("--curvlinops-block", type=int, default=None,
                        help="columns per curvlinops matmat (default k; GPT-2's logits need 4 or fewer in 24 GB)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["curvlinops", "generic", "retained_graph"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "process"], default="wall")
    parser.add_argument("--profile", choices=["resnet", "gpt2"], help="print the fused path's profile and stop")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    _timing.set_threads(args.threads)
    CLOCK["clock"] = _timing.Clock(args.clock)
    loss_fn = nn.CrossEntropyLoss()
    if args.profile:
        model, batch = make_case(args.profile, args)
        n = sum(p.numel() for p in model.parameters())
        profile(model, batch, torch.randn(args.k, n, generator=torch.Generator().manual_seed(2)))
        return None
    report = {
        "command": "python benchmarks/fused_graph_ratio.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "k": args.k, "clock": _timing.CLOCKS[CLOCK["clock"].kind].__name__,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "models": {},
    }
    for name in args.models:
        model, batch = make_case(name, args)
        params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        V = torch.randn(args.k, n, generator=torch.Generator().manual_seed(2))
        with _timing.stopwatch() as watch:
            operator = hessgap.HessianOperator(model, [batch], loss_fn=loss_fn, chunk_size=args.chunk_size)
            operator.matmat(V[:2])  # captures the graph
        setup = watch.seconds
        print(f"[{name}] n = {n:,}, path {operator.path} {operator.fallback_reason or ''}, capture + first call "
              f"{setup:.1f} s", flush=True)
        rounds = _timing.Rounds(clock=CLOCK["clock"].kind)
        rows = rounds.seconds
        base = V[: args.baseline_vectors]
        for r in range(args.rounds):
            rounds.add("gradient", gradient_time(model, batch, loss_fn))
            rounds.add("fused", fused_time(operator, V))
            if "retained_graph" not in args.skip:
                rounds.add("retained_graph", retained_graph_time(model, batch, loss_fn, base))
            if "curvlinops" not in args.skip:
                rounds.add("curvlinops", curvlinops_time(model, batch, loss_fn, V, args.curvlinops_block or args.k))
            if "generic" not in args.skip:
                rounds.add("generic", generic_time(model, batch, loss_fn, V))
            rounds.add("gradient", gradient_time(model, batch, loss_fn))
            print(f"[{name}] round {r + 1} (s): " + ", ".join(f"{key}={v[-1]:.4g}" for key, v in rows.items()), flush=True)
        best = rounds.minima()  # the fastest round of each: other jobs only ever add time
        ratios = rounds.in_gradients("gradient", how="min")
        summary = {"n": n, "best_seconds": best, "per_vector_over_gradient": ratios, "seconds_per_round": rows,
                   "median_gradient": statistics.median(rows["gradient"]), "path": operator.path}
        for other in ("retained_graph", "curvlinops", "generic"):
            if other in best:
                summary[f"fused_over_{other}"] = best["fused"] / best[other]
        report["models"][name] = summary
        print(f"[{name}] per vector, × one gradient: " + ", ".join(f"{k}={v:.3g}" for k, v in ratios.items()))
        for key in ("fused_over_retained_graph", "fused_over_curvlinops", "fused_over_generic"):
            if key in summary:
                print(f"[{name}] {key} = {summary[key]:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
