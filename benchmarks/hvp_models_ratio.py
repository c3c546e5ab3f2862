"""Side by side: hessgap's generic HVP path on a GPT-2-shaped transformer and on ResNet-18-shaped CIFAR
models, against the two ways people compute Hessian-vector products today.

Every figure is the cost of one Hessian-vector product at k = 16 directions, in units of one gradient
(forward + backward of the batch's mean loss) measured in the same run, so machine speed and load cancel:

    hessgap.hvp           hessgap.hvp(model, batch, V, path="generic"): one forward, one backward with its
                          graph kept, then the 16 second backwards                                 / 16
    HessianOperator       hessgap.HessianOperator(model, batch, path="generic").matmat(V)          / 16
    retained graph        PyHessian's best mode: grads = autograd.grad(loss, params, create_graph=True),
                          then autograd.grad(grads, params, grad_outputs=v, retain_graph=True) per vector;
                          "amortized" includes building the graph once (/ 16), "per vector" leaves it out
    curvlinops            curvlinops.HessianLinearOperator(...) @ V (vmap over jvp of jacrev)     / 16
    chunk c               hessgap.hvp(..., path="generic", chunk_size=c): c directions per backward
                          (c = 1: plain backwards; c > 1: one vmapped backward, is_grads_batched)

Peers run with attention on PyTorch's math kernels (``sdpa_kernel(MATH)``): the CPU flash kernel has no
double-backward or forward-mode rule, so neither peer runs through it at all; hessgap reroutes by itself.

Models (random weights and data; an HVP's cost does not depend on the values):

    gpt2            transformers GPT2LMHeadModel, 4 layers, width 256, 4 heads, vocabulary 8192, sequence 128,
                    batch 8 (5.3M parameters; a next-token loss over 8 × 127 tokens)
    resnet18-hf     transformers ResNetForImageClassification, ResNet-18 layout ([2, 2, 2, 2] basic blocks,
                    64–512 channels, 10 classes; its ImageNet stem, 7×7/2 and a max-pool), 3×32×32 images,
                    batch 32 (11.2M parameters)
    resnet18-cifar  hessgap.train.resnet.cifar_resnet(18): 3×3 stem, no max-pool (11.2M parameters), batch 8
                    by default (a CIFAR ResNet-18 keeps 32×32 maps in its first stage: 8 images cost about what
                    the transformers model's 32 do)

``--bf16`` adds the top-5 eigenvalues of a small GPT-2 (2 layers, width 64, sequence 32, batch 8) in
bfloat16 against the same (rounded) weights in float32.

Rounds alternate the methods and the fastest round of each counts (other jobs on a shared machine only
add time); ``--clock process`` (the default) counts this process's CPU seconds, which with one thread is
robust to other jobs. Run from the repository root (curvlinops: ``pip install torch==2.13.0
curvlinops-for-pytorch``; it pulls a CUDA torchvision that does not load against the CPU torch and breaks
``import transformers``, so ``pip uninstall -y torchvision`` after it; curvlinops does not need it):

    python benchmarks/hvp_models_ratio.py                               # all three models, k = 16, bf16 check
    python benchmarks/hvp_models_ratio.py --models gpt2 --rounds 3 --json out.json
    python benchmarks/hvp_models_ratio.py --chunks 1 2 4 8 16           # the generic path's chunk sweep
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessgap
from hessgap.train.resnet import cifar_resnet

import _timing

CLOCK = {"clock": _timing.Clock("process")}


def timed(fn) -> float:
    return CLOCK["clock"].time(fn)


class Case:
    """A model, one batch in hessgap's structure, and the same function for the peers: ``peer_model(X)``
    returns the logits that ``peer_loss(logits, y)`` averages, with the same parameters in the same order."""

    def __init__(self, name, model, batch, peer_model, peer_X, peer_y, peer_loss):
        self.name, self.model, self.batch = name, model, batch
        self.peer_model, self.peer_X, self.peer_y, self.peer_loss = peer_model, peer_X, peer_y, peer_loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n = sum(p.numel() for p in self.params)

    def loss(self) -> torch.Tensor:
        return self.peer_loss(self.peer_model(self.peer_X), self.peer_y)


class Logits(nn.Module):
    """A transformers model as a function of one tensor to logits (what curvlinops multiplies through)."""

    def __init__(self, model, key, next_token=False):
        super().__init__()
        self.model, self.key, self.next_token = model, key, next_token

    def forward(self, x):
        logits = self.model(**{self.key: x}).logits
        if self.next_token:  # token t predicts token t + 1
            logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        return logits


def gpt2_case(layers=4, width=256, heads=4, vocab=8192, seq=128, batch=8, seed=0) -> Case:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers, n_head=heads,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed + 1))
    return Case("gpt2", model, {"input_ids": ids, "labels": ids}, Logits(model, "input_ids", next_token=True), ids,
                ids[:, 1:].reshape(-1), nn.CrossEntropyLoss())


def resnet_hf_case(batch=32, seed=0) -> Case:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                       depths=[2, 2, 2, 2], layer_type="basic", num_labels=10)
    model = transformers.ResNetForImageClassification(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    return Case("resnet18-hf", model, {"pixel_values": x, "labels": y}, Logits(model, "pixel_values"), x, y,
                nn.CrossEntropyLoss())


def resnet_cifar_case(batch=8, seed=0) -> Case:
    torch.manual_seed(seed)
    model = cifar_resnet(18).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    return Case("resnet18-cifar", model, (x, y), model, x, y, nn.CrossEntropyLoss())


# ---- the methods ------------------------------------------------------------------------------------------

def gradient(case: Case) -> None:
    grads = torch.autograd.grad(case.loss(), case.params)
    del grads


def per_parameter(case: Case, v: torch.Tensor) -> list[torch.Tensor]:
    return [piece.view_as(p) for piece, p in zip(v.split([p.numel() for p in case.params]), case.params)]


def retained_graph(case: Case, V: torch.Tensor, out: dict) -> None:
    """PyHessian's best mode; ``out`` gets the seconds of the graph and of the products apart."""
    vectors = [per_parameter(case, v) for v in V]
    with sdpa_kernel([SDPBackend.MATH]):
        clock = CLOCK["clock"]
        start = clock.now()
        grads = torch.autograd.grad(case.loss(), case.params, create_graph=True)
        middle = clock.now()
        products = [torch.autograd.grad(grads, case.params, grad_outputs=v, retain_graph=True) for v in vectors]
        out["graph"], out["products"] = middle - start, clock.now() - middle
    out["first"] = torch.cat([h.reshape(-1) for h in products[0]])


def curvlinops_operator(case: Case):
    from curvlinops import HessianLinearOperator

    return HessianLinearOperator(case.peer_model, case.peer_loss, case.params, [(case.peer_X, case.peer_y)],
                                 check_deterministic=False)


def curvlinops_product(operator, V: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.MATH]):
        return (operator @ V.T).T


# ---- one model ---------------------------------------------------------------------------------------------

def measure(case: Case, k: int, rounds: int, chunks: list[int], peers: bool) -> dict:
    V = torch.randn(k, case.n, generator=torch.Generator().manual_seed(2))
    operator = hessgap.HessianOperator(case.model, case.batch, path="generic", cache_batches=True)
    info = hessgap.hvp(case.model, case.batch, V[:1], path="generic", return_info=True)
    auto_chunk = hessgap.hvp(case.model, case.batch, V, path="generic", return_info=True).chunk_size
    curv = None
    if peers:
        try:
            curv = curvlinops_operator(case)
        except ImportError as error:
            print(f"[{case.name}] curvlinops not installed ({error}); its row is left out", flush=True)

    # the same products, checked before timing
    reference = hessgap.hvp(case.model, case.batch, V[:2], path="generic", chunk_size=1)
    check = {"HessianOperator": operator.matmat(V[:2])}
    for c in chunks:
        check[f"chunk {c}"] = hessgap.hvp(case.model, case.batch, V[: max(2, min(c, k))], path="generic",
                                          chunk_size=c)[:2]
    if peers:
        out = {}
        retained_graph(case, V[:1], out)
        check["retained graph"] = out["first"][None]
        if curv is not None:
            check["curvlinops"] = curvlinops_product(curv, V[:2])
    differences = {key: float((value - reference[: value.shape[0]]).norm() / reference[: value.shape[0]].norm())
                   for key, value in check.items()}
    print(f"[{case.name}] n = {case.n}, path {info.path}, auto chunk {auto_chunk}, notes: {info.notes}; relative "
          "difference from hessgap.hvp: " + ", ".join(f"{key} {v:.1e}" for key, v in differences.items()), flush=True)

    timing = _timing.Rounds(clock=CLOCK["clock"].kind)
    rows, add = timing.seconds, timing.add

    for index in range(rounds):
        add("gradient", timed(lambda: gradient(case)))
        add("hessgap.hvp", timed(lambda: hessgap.hvp(case.model, case.batch, V, path="generic")) / k)
        add("HessianOperator", timed(lambda: operator.matmat(V)) / k)
        if peers:
            out = {}
            retained_graph(case, V, out)
            add("retained graph (amortized)", (out["graph"] + out["products"]) / k)
            add("retained graph (per vector)", out["products"] / k)
            if curv is not None:
                add("curvlinops", timed(lambda: curvlinops_product(curv, V)) / k)
        add("gradient", timed(lambda: gradient(case)))
        for c in chunks:
            add(f"chunk {c}", timed(lambda c=c: hessgap.hvp(case.model, case.batch, V, path="generic", chunk_size=c)) / k)
        print(f"[{case.name}] round {index + 1} (s per vector): "
              + ", ".join(f"{key} {v[-1]:.3g}" for key, v in rows.items()), flush=True)
    best = timing.minima()  # the fastest round of each: other jobs only ever add time
    ratios = timing.in_gradients("gradient", how="min")
    peer_keys = [key for key in ("retained graph (amortized)", "curvlinops") if key in ratios]
    summary = {"n": case.n, "auto_chunk": auto_chunk, "notes": info.notes, "best_seconds": best,
               "per_vector_over_gradient": ratios, "differences": differences, "seconds_per_round": rows}
    if peer_keys:
        best_peer = min(peer_keys, key=lambda key: ratios[key])
        summary["best_peer"] = best_peer
        summary["hessgap_over_best_peer"] = {key: ratios[key] / ratios[best_peer]
                                             for key in ("hessgap.hvp", "HessianOperator")}
    return summary


def bf16_comparison(k: int = 5) -> dict:
    """Top-k eigenvalues of a small GPT-2 in bfloat16 and of the same rounded weights in float32."""
    case = gpt2_case(layers=2, width=64, heads=2, vocab=512, seq=32, batch=8, seed=3)
    low = copy.deepcopy(case.model).to(torch.bfloat16)
    full = copy.deepcopy(low).float()
    out = {}
    for label, model in (("bfloat16", low), ("float32", full)):
        result, seconds, _ = _timing.wall_and_process(lambda model=model: hessgap.eigenvalues(model, case.batch, k=k))
        out[label] = {"eigenvalues": result.eigenvalues, "residuals": result.residuals, "converged": result.converged,
                      "iterations": result.iterations, "hvps": result.hvps, "seconds": seconds,
                      "dtype": result.dtype, "model_dtype": result.model_dtype}
    top = abs(out["float32"]["eigenvalues"][0])
    out["relative_difference"] = [abs(a - b) / abs(b) for a, b in zip(out["bfloat16"]["eigenvalues"],
                                                                        out["float32"]["eigenvalues"])]
    out["difference_over_top"] = [abs(a - b) / top for a, b in zip(out["bfloat16"]["eigenvalues"],
                                                                   out["float32"]["eigenvalues"])]
    return out


CASES = {"gpt2": lambda args: gpt2_case(batch=args.gpt2_batch),
         "resnet18-hf": lambda args: resnet_hf_case(batch=args.resnet_batch),
         "resnet18-cifar": lambda args: resnet_cifar_case(batch=args.cifar_batch)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--k", type=int, default=16, help="directions per product (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every method; the fastest counts")
    parser.add_argument("--chunks", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                        help="chunk sizes of the generic path to time (none: skip the sweep)")
    parser.add_argument("--gpt2-batch", type=int, default=8)
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--cifar-batch", type=int, default=8)
    parser.add_argument("--no-peers", action="store_true", help="leave out the retained graph and curvlinops")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="add the bfloat16-vs-float32 top-5 eigenvalues of a small GPT-2 (default on)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=["process", "wall"], default="process",
                        help="process: CPU seconds of this process (robust to other jobs with one thread); wall")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    _timing.set_threads(args.threads)
    CLOCK["clock"] = _timing.Clock(args.clock)
    try:
        import curvlinops
        curvlinops_version = getattr(curvlinops, "__version__", None) or _timing.version("curvlinops-for-pytorch")
    except ImportError:
        curvlinops_version = None
    report = {
        "command": "python benchmarks/hvp_models_ratio.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{_timing.cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
                   f"transformers {_timing.version('transformers')}, curvlinops {curvlinops_version}",
        "clock": args.clock, "k": args.k,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "models": {},
    }
    print(report["machine"], flush=True)
    for name in args.models:
        case = CASES[name](args)
        summary = measure(case, args.k, args.rounds, args.chunks, not args.no_peers)
        report["models"][name] = summary
        print(f"[{name}] per vector, × one gradient (fastest rounds): "
              + ", ".join(f"{key} {v:.3g}" for key, v in summary["per_vector_over_gradient"].items()), flush=True)
        if "hessgap_over_best_peer" in summary:
            print(f"[{name}] hessgap / best peer ({summary['best_peer']}): "
                  + ", ".join(f"{key} {v:.3f}" for key, v in summary["hessgap_over_best_peer"].items()), flush=True)
    if args.bf16:
        report["bf16"] = bf16_comparison()
        b = report["bf16"]
        print("[bf16] top-5 eigenvalues, small GPT-2: bfloat16 "
              + " ".join(f"{v:.4g}" for v in b["bfloat16"]["eigenvalues"]) + " | float32 "
              + " ".join(f"{v:.4g}" for v in b["float32"]["eigenvalues"]), flush=True)
        print("[bf16] relative differences " + " ".join(f"{v:.2e}" for v in b["relative_difference"])
              + f"; iterations {b['bfloat16']['iterations']} vs {b['float32']['iterations']}, converged "
              f"{b['bfloat16']['converged']} / {b['float32']['converged']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
