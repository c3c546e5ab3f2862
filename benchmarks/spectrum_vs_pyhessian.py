"""hessgap's spectrum methods side by side with PyHessian on the same model, data and machine.

For an F1-sized MLP (784-5×512-10 with BatchNorm, 1024 samples) and a small conv net (C1 at width 1/4,
256 samples), both briefly trained on scikit-learn's digits upsampled to 28×28:

* top-1 and top-10 eigenvalues: PyHessian's power iteration (tol 1e-3 between iterates, deflation for
  top-n) against hessgap.eigenvalues (tol 1e-3), both timed and both scored against a converged
  reference (hessgap.eigenvalues at tol 1e-6);
* trace: PyHessian's sequential Hutchinson against hessgap.trace with the same number of probes in
  one batch; the two estimates must agree within their combined standard errors;
* density: PyHessian's sequential SLQ against hessgap.density with the same probes and steps.

Times are also given in units of one gradient (forward + backward over the same batch) measured in
the same run. PyHessian is a benchmark-only dependency: ``pip install pyhessian`` (its density uses
``torch.eig``, which torch removed; this script supplies it from ``torch.linalg.eigh``).

    python benchmarks/spectrum_vs_pyhessian.py                      # CPU, both models
    python benchmarks/spectrum_vs_pyhessian.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hessgap
from hessgap.curvature.operator import HessianOperator
from hessgap.train.data import load_dataset
from hessgap.train.models import build_model, count_parameters

import _timing


@contextlib.contextmanager
def timed(device, record: dict, key: str = "seconds"):
    """Times the block on the wall clock (synchronized on CUDA) into ``record[key]``."""
    with _timing.stopwatch(_timing.Clock("wall", device)) as watch:
        yield
    record[key] = watch.seconds


def digits_28(samples: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` training digits, bilinearly upsampled from 8×8 to 28×28."""
    dataset = load_dataset("digits")
    x, y = dataset.train.tensors
    if samples > x.shape[0]:
        repeats = math.ceil(samples / x.shape[0])
        x, y = x.repeat(repeats, 1, 1, 1), y.repeat(repeats)
    x = F.interpolate(x[:samples].reshape(-1, 1, 8, 8), size=(28, 28), mode="bilinear", align_corners=False)
    return x.to(device), y[:samples].to(device)


def make_problem(name: str, device, train_steps: int, seed: int):
    torch.manual_seed(seed)
    if name == "mlp":
        model, samples = build_model("F1", (1, 28, 28), 10), 1024
    else:
        model, samples = build_model("C1", (1, 28, 28), 10, width=0.25, dropout=0.0), 256
    model = model.to(device)
    x, y = digits_28(samples, device)
    # A short training run so the Hessian has the outliers of a trained network, not of its initialization.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(train_steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, x, y


def gradient_seconds(model, x, y, device, repeats=5) -> float:
    """Median time of one forward + backward of the mean loss over the batch."""
    def gradient():
        torch.autograd.grad(F.cross_entropy(model(x), y), [p for p in model.parameters() if p.requires_grad])

    return float(np.median(_timing.repeat(gradient, repeats, _timing.Clock("wall", device), warmup=1)))


class PyHessianRun:
    """PyHessian on one batch (retained-graph HVPs), counting its Hessian-vector products."""

    def __init__(self, model, x, y, device):
        import importlib
        import sys

        importlib.import_module("pyhessian.hessian")
        module = sys.modules["pyhessian.hessian"]  # the package re-exports the class under the same name
        self.module = module
        self.count = 0
        original = module.hessian_vector_product

        def counted(gradsH, params, v):
            self.count += 1
            return original(gradsH, params, v)

        module.hessian_vector_product = counted
        # torch.eig was removed from torch (a stub that raises is left); PyHessian's density still calls it.
        def eig(T, eigenvectors=True):
            values, vectors = torch.linalg.eigh(T)
            return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

        torch.eig = eig
        self.model, self.x, self.y, self.device = model, x, y, device

    def build(self):
        for p in self.model.parameters():
            p.grad = None
        return self.module.hessian(self.model, nn.CrossEntropyLoss(), data=(self.x, self.y), cuda=self.device.type == "cuda")

    def run(self, method: str, **kwargs) -> dict:
        torch.manual_seed(0)
        self.count = 0
        record: dict = {}
        with timed(self.device, record):
            value = getattr(self.build(), method)(**kwargs)
        for p in self.model.parameters():
            p.grad = None
        record["hvps"] = self.count
        record["value"] = value
        return record


def relative_errors(values, reference):
    return [abs(v - r) / abs(r) for v, r in zip(values, reference)]


def compare_eigenvalues(pyh: PyHessianRun, model, x, y, device, top: int, reference: list[float], unit: float,
                        block_sizes, repeats: int = 1):
    """Each method run ``repeats`` times, interleaved; the median time is reported with all times."""
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        theirs = pyh.run("eigenvalues", top_n=top, tol=1e-3, maxIter=100)
        values = sorted(theirs["value"][0], reverse=True)
        runs.setdefault(f"PyHessian power iteration, top-{top}", []).append({
            "seconds": theirs["seconds"], "hvps": theirs["hvps"],
            "max_rel_error": max(relative_errors(values, reference[:top])), "eigenvalues": values,
        })
        for b in block_sizes:
            record: dict = {}
            with timed(device, record):
                ours = hessgap.eigenvalues(model, (x, y), k=top, tol=1e-3, block_size=b)
            runs.setdefault(f"hessgap.eigenvalues top-{top}, block {ours.block_size}", []).append({
                "seconds": record["seconds"], "hvps": ours.hvps,
                "max_rel_error": max(relative_errors(ours.eigenvalues, reference[:top])), "converged": ours.converged,
                "eigenvalues": ours.eigenvalues,
            })
    rows = []
    for method, results in runs.items():
        seconds = [r["seconds"] for r in results]
        median = float(np.median(seconds))
        rows.append({"method": method, "seconds": median, "gradients": median / unit, "all_seconds": seconds,
                     **{key: value for key, value in results[-1].items() if key != "seconds"}})
    return rows


def compare_trace(pyh: PyHessianRun, model, x, y, device, probes: int, unit: float):
    theirs = pyh.run("trace", maxIter=probes, tol=0.0)  # tol=0: exactly `probes` probes, no early stop
    estimates = np.array(theirs["value"])
    their_value, their_se = float(estimates.mean()), float(estimates.std(ddof=1) / math.sqrt(len(estimates)))
    rows = [{"method": f"PyHessian trace, {len(estimates)} sequential probes", "seconds": theirs["seconds"],
             "gradients": theirs["seconds"] / unit, "hvps": theirs["hvps"], "value": their_value, "stderr": their_se}]
    # seed 0 draws the very probes PyHessian drew (same CPU generator stream): the estimates must agree to
    # rounding; seed 1 draws independent probes: they must agree within the combined standard errors.
    for seed in (0, 1):
        record: dict = {}
        with timed(device, record):
            ours = hessgap.trace(model, (x, y), num_probes=probes, seed=seed)
        rows.append({
            "method": f"hessgap.trace, {probes} probes in one batch, seed {seed}", "seconds": record["seconds"],
            "gradients": record["seconds"] / unit, "hvps": ours.hvps, "value": ours.value, "stderr": ours.stderr,
            "z_difference": abs(ours.value - their_value) / math.sqrt(ours.stderr**2 + their_se**2),
        })
    return rows


def compare_density(pyh: PyHessianRun, model, x, y, device, probes: int, steps: int, unit: float):
    theirs = pyh.run("density", iter=steps, n_v=probes)
    nodes, weights = theirs["value"]
    their_mean = float(np.mean([np.dot(w, t) for t, w in zip(nodes, weights)]))
    their_top = float(max(max(t) for t in nodes))
    record: dict = {}
    with timed(device, record):
        ours = hessgap.density(model, (x, y), num_probes=probes, lanczos_steps=steps)
    our_top = max(max(t) for t in ours.nodes)
    return [
        {"method": f"PyHessian SLQ, {probes} probes × {steps} steps, sequential", "seconds": theirs["seconds"],
         "gradients": theirs["seconds"] / unit, "hvps": theirs["hvps"], "mean_eigenvalue": their_mean, "top_node": their_top},
        {"method": f"hessgap.density, {probes} probes × {steps} steps, batched", "seconds": record["seconds"],
         "gradients": record["seconds"] / unit, "hvps": ours.hvps, "mean_eigenvalue": ours.mean(), "top_node": our_top},
    ]


def batched_hvp_cost(model, x, y, device, ks=(1, 2, 4, 8, 16), repeats=3):
    """Per-vector cost of one batched product in gradients, each k timed beside a gradient (median of repeats)."""
    operator = HessianOperator(model, (x, y))
    rows = []
    for k in ks:
        V = torch.randn(k, operator.n, device=device, dtype=operator.dtype)
        operator.matmat(V)  # warm-up
        ratios = []
        for _ in range(repeats):
            unit = gradient_seconds(model, x, y, device, repeats=1)
            record: dict = {}
            with timed(device, record):
                operator.matmat(V)
            ratios.append(record["seconds"] / k / unit)
        rows.append({"k": k, "per_vector_gradients": float(np.median(ratios)), "path": operator.path})
    return rows


def save(report, path):
    if path:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--trace-probes", type=int, default=32)
    parser.add_argument("--slq-probes", type=int, default=2)
    parser.add_argument("--slq-steps", type=int, default=40)
    parser.add_argument("--top", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[0], help="0 means hessgap's default")
    parser.add_argument("--skip", nargs="*", default=[], choices=["eigenvalues", "trace", "density", "hvp"])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each top-1 method (median)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (1 is steadier on a shared, oversubscribed CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    device = torch.device(args.device)
    _timing.set_threads(args.threads)
    block_sizes = [None if b == 0 else b for b in args.block_sizes]

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, device {device}",
        "models": {},
    }
    for name in args.models:
        model, x, y = make_problem(name, device, args.train_steps, args.seed)
        unit = gradient_seconds(model, x, y, device)
        operator = HessianOperator(model, (x, y))
        entry = {"parameters": count_parameters(model), "samples": int(x.shape[0]), "gradient_seconds": unit,
                 "hvp_path": operator.path, "sections": {}}
        print(f"\n== {name}: n = {entry['parameters']}, {entry['samples']} samples, one gradient = {unit * 1e3:.1f} ms, "
              f"HVP path {operator.path}", flush=True)
        pyh = PyHessianRun(model, x, y, device)
        report["models"][name] = entry  # filled section by section, saved after each
        if "hvp" not in args.skip:
            entry["sections"]["batched_hvp"] = batched_hvp_cost(model, x, y, device)
            print(json.dumps(entry["sections"]["batched_hvp"]), flush=True)
        if "eigenvalues" not in args.skip:
            top = max(args.top)
            reference = hessgap.eigenvalues(model, (x, y), k=top + 1, tol=1e-6)
            entry["reference_eigenvalues"] = reference.eigenvalues[:top]
            entry["reference_error_estimates"] = reference.error_estimates[:top]
            for count in args.top:
                rows = compare_eigenvalues(pyh, model, x, y, device, count, reference.eigenvalues, unit, block_sizes,
                                          args.repeats if count == 1 else 1)
                entry["sections"][f"top{count}"] = rows
                for row in rows:
                    print(json.dumps(row), flush=True)
                save(report, args.json)
        if "trace" not in args.skip:
            entry["sections"]["trace"] = compare_trace(pyh, model, x, y, device, args.trace_probes, unit)
            for row in entry["sections"]["trace"]:
                print(json.dumps(row), flush=True)
            save(report, args.json)
        if "density" not in args.skip:
            entry["sections"]["density"] = compare_density(pyh, model, x, y, device, args.slq_probes, args.slq_steps, unit)
            for row in entry["sections"]["density"]:
                print(json.dumps(row), flush=True)
        report["models"][name] = entry
    save(report, args.json)


if __name__ == "__main__":
    main()
