"""The Gauss-Newton product against the Hessian's, Hutch++ against Hutchinson, finite differences against exact.

Three tables (``--tables ggn,hutchpp,fd``), run from the repository root:

    python benchmarks/ggn_ratio.py --threads 1 --clock process
    python benchmarks/ggn_ratio.py --tables ggn --models gpt2 --k 4 --rounds 3

``ggn``: seconds per vector of ``GGNOperator.matmat`` over ``HessianOperator.matmat`` (both fused, k vectors
per call, the primal pass of every call included, the capture done before timing), interleaved rounds, the
median round of each. Models (random weights, eval mode, cross-entropy):

    gpt2       GPT-2-shaped (transformers): 4 layers × width 256, 4 heads, vocabulary 50257, sequences of 64;
               next-token logits (B, vocab, T−1)
    resnet     ResNet-18-shaped (transformers ResNetForImageClassification, basic blocks [2, 2, 2, 2],
               widths 64-512, CIFAR 3×32×32 inputs, 10 classes)
    timm       ResNet-18 as plain PyTorch modules (timm ``resnet18``, 10 classes, 3×32×32 inputs; timm needs
               torchvision, which this machine's environment lacks: not in the default list)

``hutchpp``: mean |estimate − tr| over seeds at equal products (30), Hutchinson vs Hutch++ vs adaptive Hutch++,
on a 500×500 matrix whose top 10 eigenvalues dominate and on a small MLP's GGN (exact trace from its matrix).

``fd``: the relative error ‖H·v_fd − H·v‖/‖H·v‖ of ``hvp(method="finite-difference")`` (h = ε^(1/3)(1+‖θ‖)/‖v‖)
against the exact product taken in float64, for float32 and bfloat16 copies of a small MLP and of a tiny GPT-2.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from fused_graph_ratio import ImageClassifier, LanguageModel
from torch import nn

import hessgap

import _timing


def make_case(name: str, args):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    images = (torch.randn(args.image_batch, 3, 32, 32, generator=gen),
              torch.randint(0, 10, (args.image_batch,), generator=gen))
    if name == "resnet":
        config = transformers.ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                           depths=[2, 2, 2, 2], layer_type="basic", num_labels=10)
        return ImageClassifier(transformers.ResNetForImageClassification(config)).eval(), images
    if name == "timm":
        import timm

        return timm.create_model("resnet18", num_classes=10).eval(), images
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=50257, n_positions=args.seq)
    ids = torch.randint(0, 50257, (args.text_batch, args.seq), generator=gen)
    return LanguageModel(transformers.GPT2LMHeadModel(config)).eval(), (ids, ids[:, 1:])


def ggn_table(args) -> None:
    print(f"| model | parameters | HVP s/vector | GGN s/vector | GGN / HVP | paths |  ({args.clock} clock, k={args.k})")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.models:
        model, batch = make_case(name, args)
        hessian = hessgap.HessianOperator(model, [batch], path="fused")
        ggn = hessgap.GGNOperator(model, [batch], path="fused")
        V = torch.randn(args.k, hessian.n, generator=torch.Generator().manual_seed(2))
        rounds = _timing.interleaved({"hvp": lambda h=hessian, V=V: h.matmat(V), "ggn": lambda g=ggn, V=V: g.matmat(V)},
                                     args.rounds, clock=args.clock, per={"hvp": args.k, "ggn": args.k})
        hvp_s, ggn_s = rounds.median("hvp"), rounds.median("ggn")
        print(f"| {name} | {hessian.n:,} | {hvp_s:.3f} | {ggn_s:.3f} | {ggn_s / hvp_s:.2f} | "
              f"{hessian.path}/{ggn.path} |", flush=True)


def _decaying(n=500, top=10):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.cat([torch.linspace(100, 10, top, dtype=torch.float64),
                        0.1 * torch.rand(n - top, generator=g, dtype=torch.float64)])
    return (q * values) @ q.T


def hutchpp_table(args) -> None:
    cases = {"matrix 500×500, top-10 dominant": _decaying()}
    for samples in (3, 8):  # the GGN's rank is at most samples × (classes − 1): 12 (top-10 dominate), 32
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5)).double()
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(samples, 20, generator=g, dtype=torch.float64),
                 torch.randint(0, 5, (samples,), generator=g))]
        ggn = hessgap.GGNOperator(mlp, data, cache_batches=True)
        label = f"MLP GGN (n = {ggn.n}, {samples} samples × 5 classes, rank ≤ {4 * samples})"
        cases[label] = ggn.matmat(torch.eye(ggn.n, dtype=torch.float64))
    methods = ("hutchinson", "hutch++", "adaptive-hutch++")
    print(f"| matrix | products | {' | '.join(methods)} | hutch++ / hutchinson |  (mean |error| over {args.seeds} seeds)")
    print("|---|---:|---:|---:|---:|---:|")
    for label, matrix in cases.items():
        exact = float(matrix.trace())
        errors = [statistics.mean(abs(hessgap.trace(matrix, num_probes=30, seed=s, method=m).value - exact)
                                  for s in range(args.seeds)) for m in methods]
        print(f"| {label} | 30 | {' | '.join(f'{e:.3g}' for e in errors)} | {errors[1] / errors[0]:.3f} |")


def fd_table(args) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    mlp_data = [(torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g))]
    gpt = LanguageModel(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=32))).eval()
    ids = torch.randint(0, 500, (4, 32), generator=g)
    cases = {"MLP 32-64-10": (mlp, mlp_data), "GPT-2 2×64": (gpt, [(ids, ids[:, 1:])])}
    print("| model | dtype | relative error of the FD product (mean over 4 vectors) | h |")
    print("|---|---|---:|---:|")
    for label, (model, data) in cases.items():
        exact_model = copy.deepcopy(model).double()
        n = sum(p.numel() for p in model.parameters())
        V = torch.randn(4, n, generator=torch.Generator().manual_seed(3))
        cast = [(x.double() if x.is_floating_point() else x, y) for x, y in data]
        exact = hessgap.hvp(exact_model, cast, V.double())
        for dtype in (torch.float32, torch.bfloat16):
            low = copy.deepcopy(model).to(dtype)
            low_data = [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in data]
            operator = hessgap.HessianOperator(low, low_data, method="finite-difference")
            approx = operator.matmat(V.to(operator.dtype)).double()
            error = ((approx - exact).norm(dim=1) / exact.norm(dim=1)).mean()
            h = statistics.mean(operator._engine.steps)
            print(f"| {label} | {str(dtype).removeprefix('torch.')} | {float(error):.2e} | {h:.2e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="ggn,hutchpp,fd")
    parser.add_argument("--models", default="gpt2,resnet")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--text-batch", type=int, default=4)
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="process", choices=["wall", "process"])
    args = parser.parse_args()
    args.models = args.models.split(",")
    _timing.set_threads(args.threads)
    print(_timing.machine())
    tables = {"ggn": ggn_table, "hutchpp": hutchpp_table, "fd": fd_table}
    for name in args.tables.split(","):
        tables[name](args)


if __name__ == "__main__":
    main()
