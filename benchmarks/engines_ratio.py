"""The graph engine against the layer-stack engine on the paper's networks (F1, F2, C1–C4), per vector.

Both engines run the same ``hessgap.hvp`` call on one batch (eval mode, k directions); the graph engine is
forced by making the layer-stack engine's planner refuse the model. Rounds alternate the two engines (after
a warm-up call each, which also makes the graph engine's capture); the figure is the median over rounds of
the seconds per vector, one torch thread, on the process-CPU clock by default. Each row also gives the
relative difference of the two engines' products (they compute the same exact product).

    python benchmarks/engines_ratio.py                       # all six, k = 16
    python benchmarks/engines_ratio.py --models F1 C1 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

import hessgap
from hessgap.curvature import fused
from hessgap.train.models import build_model

import _timing

#: (input shape, classes, batch) per network: MNIST, TIMIT frames, CIFAR-10, CIFAR-100 as in the paper
NETWORKS = {"F1": ((784,), 10, 256), "F2": ((360,), 1973, 256), "C1": ((3, 32, 32), 10, 128),
            "C2": ((3, 32, 32), 10, 32), "C3": ((3, 32, 32), 100, 128), "C4": ((3, 32, 32), 100, 32)}


@contextlib.contextmanager
def graph_engine():
    """The layer-stack engine refuses every model while this is active: the graph engine takes them."""
    real = fused.plan

    def refuse(*args, **kwargs):
        raise fused.FusedUnsupported("benchmark: the graph engine is measured")

    fused.plan = refuse
    try:
        yield
    finally:
        fused.plan = real


def measure(name: str, k: int, rounds: int, clock: str, width: float) -> dict:
    shape, classes, rows = NETWORKS[name]
    torch.manual_seed(0)
    model = build_model(name, shape, classes, width=width).eval()
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(rows, *shape, generator=gen), torch.randint(0, classes, (rows,), generator=gen))
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(k, n, generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()

    def stack():
        return hessgap.hvp(model, data, V, loss_fn=loss_fn, return_info=True)

    def graph():
        with graph_engine():
            return hessgap.hvp(model, data, V, loss_fn=loss_fn, return_info=True)

    a, b = stack(), graph()
    assert a.path == b.path == "fused", (a.fallback_reason, b.fallback_reason)
    difference = float((a.value - b.value).norm() / a.value.norm())
    result = _timing.interleaved({"layer-stack": stack, "graph": graph}, rounds, clock=clock,
                                 per={"layer-stack": k, "graph": k})
    medians = result.medians()
    return {"model": name, "parameters": n, "batch": rows, "k": k, "seconds_per_vector": medians,
            "graph/layer-stack": medians["graph"] / medians["layer-stack"], "relative_difference": difference,
            "rounds": result.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--clock", default="process", choices=sorted(_timing.CLOCKS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    _timing.set_threads(args.threads)
    rows = []
    for name in args.models:
        row = measure(name, args.k, args.rounds, args.clock, args.width)
        rows.append(row)
        s = row["seconds_per_vector"]
        print(f"{name}: {row['parameters']} parameters, batch {row['batch']}: layer-stack {s['layer-stack'] * 1e3:.1f} ms, "
              f"graph {s['graph'] * 1e3:.1f} ms per vector, graph/layer-stack {row['graph/layer-stack']:.3f}, "
              f"products differ by {row['relative_difference']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _timing.machine(), "clock": args.clock, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
