"""The model zoo: where every model people train stands with hessgap's HVP (path, exactness, speed, memory).

For each configuration of ``benchmarks/zoo_models.py`` (Hugging Face GPT-2, Llama, Qwen3, Gemma-3, Mistral,
Mixtral, Qwen3-MoE, BERT, RoBERTa, T5, BART, ViT, Swin, ConvNeXt; timm ResNet-18, EfficientNet-B0,
MobileNetV3 small/large, ConvNeXt-atto, ViT-tiny; an LSTM and a GRU; a ``torch.compile``'d CNN; hessgap's CIFAR
ResNet-18 and an MLP), random weights, eval mode:

- path: the path ``hessgap.HessianOperator(model, data)`` takes (fused or generic) and why not fused;
- exactness (``benchmarks/zoo_check.py``): relative error of hessgap's HVP on a float64 copy over two ragged
  batches against a float64 double backward (≤ 1e-10 where the model computes in float64; models that cast to
  float32 inside are held to float32's level and also checked against hessgap's generic path);
- per vector at k = 16, in gradients (one forward + backward of the same batch's loss, timed in the same
  interleaved rounds; medians): hessgap (``HessianOperator.matmat`` of the k vectors, its primal pass included:
  the capture is done before timing), a retained-graph double backward (the gradient built once with
  create_graph, not timed, then one ``autograd.grad`` per vector: PyHessian's mode; timed on
  ``--baseline-vectors`` vectors, its cost per vector is flat) and curvlinops' ``HessianLinearOperator`` matmat
  (blocks of ``--curvlinops-block`` columns). The peers differentiate the uncompiled model with attention on
  PyTorch's math kernels (the fused CPU kernels have no double-backward or forward-mode rule);
- peak memory of each method with k vectors, in a fresh process: resident set above the model+data baseline
  (and CUDA's max_memory_allocated on a GPU);
- capture seconds: building the operator and its first product (torch.export capture for the graph engine).

A configuration that raises gets a row saying what raised; the run goes on. With ``--json`` each finished
configuration is saved at once and a rerun skips it (a configuration whose process died is marked so).

    python benchmarks/zoo.py --size tiny --rounds 1 --no-memory             # minutes: the wiring
    python benchmarks/zoo.py --json zoo.json --results benchmarks/RESULTS.md  # the table (about 1-2 h on 1 thread)
    python benchmarks/zoo.py --models gpt2 llama --k 16 --rounds 5 --threads 1
    python benchmarks/zoo.py --json zoo.json --table-only --results benchmarks/RESULTS.md

The full zoo needs timm, which needs torchvision, and the torchvision wheel for torch 2.13 on the package
index is a CUDA build that does not import against the CPU torch 2.13. It therefore runs in a venv of its own
with torch 2.14.1 (a CUDA build that runs on CPUs) and hessgap's extension compiled against it in a second
checkout (building in place would replace the extension the test venv needs):

    python3 -m venv /work/venv-zoo
    /work/venv-zoo/bin/pip install torch==2.14.1 torchvision==0.29.1 timm transformers accelerate numpy scipy \\
        pytest setuptools wheel ninja pybind11 einops
    /work/venv-zoo/bin/pip install --no-deps curvlinops-for-pytorch einconv opt-einsum linear_operator
    git worktree add --detach ../zoo-build HEAD && cd ../zoo-build
    HESSGAP_FORCE_CPU=1 /work/venv-zoo/bin/python setup.py build_ext --inplace
    PYTHONPATH=. /work/venv-zoo/bin/python benchmarks/zoo.py --json zoo.json --results benchmarks/RESULTS.md

(``PYTHONPATH=.``: hessgap is not installed in that venv; the checkout's own copy is imported.)

(curvlinops is installed without its dependencies, which would pull backpack and another torch; the four
modules it imports at start are added by hand.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessgap

import _timing
import zoo_check
import zoo_models
from zoo_report import render, write_results

METHODS = ("hessgap", "retained_graph", "curvlinops")


# ---- the methods (shared by the timing rounds and the memory children) ----------------------------------------

def vectors(case, k: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(k, case.n, generator=torch.Generator().manual_seed(seed)).to(case.device)


def gradient(case, batch) -> None:
    loss = case.loss_fn(case.model(*batch[:-1]), batch[-1])
    torch.autograd.grad(loss, case.params, allow_unused=True)


def hessgap_operator(case, batch):
    return hessgap.HessianOperator(case.model, [batch], loss_fn=case.loss_fn)


def retained_graph(case, batch):
    """The gradient with its graph kept (create_graph), and the products H·v through it, one per vector."""
    params = case.params
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(case.loss_fn(case.eager(*batch[:-1]), batch[-1]), params, create_graph=True,
                                    allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    sizes = [p.numel() for p in params]

    def products(V):
        out = []
        for v in V:
            pieces = [piece.view_as(p) for piece, p in zip(v.split(sizes), params)]
            out.append(torch.autograd.grad([grads[i] for i in live], params, [pieces[i] for i in live],
                                           retain_graph=True, allow_unused=True))
        return out

    return products


class Packed(torch.nn.Module):
    """A model of several positional inputs as a function of one mapping (what curvlinops passes along)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, X):
        return self.model(*(X[f"x{i}"] for i in range(len(X))))


def curvlinops_operator(case, batch):
    from curvlinops import HessianLinearOperator

    inputs, targets = batch[:-1], batch[-1]
    if len(inputs) == 1:
        model, X, options = case.eager, inputs[0], {}
    else:
        model, X = Packed(case.eager), {f"x{i}": x for i, x in enumerate(inputs)}
        options = {"batch_size_fn": lambda X: X["x0"].shape[0]}
    operator = HessianLinearOperator(model, case.loss_fn, case.params, [(X, targets)], check_deterministic=False,
                                     **options)

    def products(V, block):
        with sdpa_kernel([SDPBackend.MATH]):
            columns = V.T.contiguous()
            return [operator @ columns[:, i : i + block] for i in range(0, columns.shape[1], block)]

    return products


def memory_setup(name: str, size: str, method: str, k: int, block: int, device: str):
    """In a memory child: build the configuration, warm ``method`` up on one vector, return its run on k."""
    warnings.simplefilter("ignore")
    case = zoo_models.build(name, size).to(device)
    batch, V = case.timing_batch, vectors(case, k)
    if method == "hessgap":
        operator = hessgap_operator(case, batch)
        operator.matmat(V[:1])
        return lambda: operator.matmat(V)
    if method == "retained_graph":
        retained_graph(case, batch)(V[:1])
        return lambda: retained_graph(case, batch)(V)
    products = curvlinops_operator(case, batch)
    products(V[:1], 1)
    return lambda: products(V, block)


# ---- one configuration ---------------------------------------------------------------------------------------------

def measure(name: str, args, log, keep=lambda record: None) -> dict:
    """Every figure of one configuration; ``keep(record)`` is called after each stage and round with what is
    measured so far (a long run on a busy machine keeps what it measured when it is stopped)."""
    record = {"config": name, "size": args.size}
    try:
        case = zoo_models.build(name, args.size)
    except Exception as error:
        record.update(error=f"building it raised {_timing.describe_error(error)}", retry=True)
        return record
    record.update(family=case.family, shape=case.shape, n=case.n)
    log(f"[{name}] n = {case.n:,}, timing batch {case.shape}")
    record["check"] = _stage(record, "check", lambda: zoo_check.check(case, k=args.check_vectors), log) or {}
    keep(record)
    case.to(args.device)
    batch, V = case.timing_batch, vectors(case, args.k)

    def capture():
        with _timing.stopwatch() as watch:  # wall seconds: what a user waits for
            operator = hessgap_operator(case, batch)
            operator.matmat(V[:1])
        record.update(path=operator.path, fallback_reason=operator.fallback_reason, notes=list(operator.notes))
        record["capture_seconds"] = watch.seconds
        return operator

    operator = _stage(record, "capture", capture, log)
    keep(record)
    log(f"[{name}] path {record.get('path')} {record.get('fallback_reason') or ''}; check "
        f"{ {key: record.get('check', {}).get(key) for key in ('exact', 'error_reference', 'error_generic')} }")
    gradient(case, batch)  # warm (and, for the compiled model, compile) before the rounds
    methods = {"gradient": lambda: gradient(case, batch)}
    per = {"gradient": 1, "hessgap": args.k, "retained_graph": args.baseline_vectors, "curvlinops": args.k}
    if operator is not None:
        methods["hessgap"] = lambda: operator.matmat(V)
    if "retained_graph" not in args.skip:
        products = _stage(record, "retained_graph_setup", lambda: _warm(retained_graph(case, batch), V[:1]), log)
        if products is not None:
            methods["retained_graph"] = lambda: products(V[: args.baseline_vectors])
    if "curvlinops" not in args.skip:
        curvlinops = _stage(record, "curvlinops_setup", lambda: _warm(curvlinops_operator(case, batch), V[:1], 1), log)
        if curvlinops is not None:
            methods["curvlinops"] = lambda: curvlinops(V, args.curvlinops_block)

    def progress(index, rounds):
        log(f"[{name}] round {index + 1} (s per unit): "
            + ", ".join(f"{key} {value:.4g}" for key, value in rounds.last().items()))
        _costs(record, rounds)
        keep(record)

    rounds = _timing.interleaved(methods, args.rounds, clock=_timing.Clock(args.clock, args.device), per=per,
                                 warmup=1, keep_going=True, on_round=progress)
    _costs(record, rounds)
    if "gradient" in rounds.seconds:
        log(f"[{name}] per vector in gradients (medians): "
            + ", ".join(f"{key} {value:.3g}" for key, value in record["in_gradients"].items()))
    methods.clear()  # frees the retained graph and the operator's buffers before the memory children
    operator = products = curvlinops = None
    if not args.no_memory:
        record["memory"] = {}
        for method in METHODS:
            if method in rounds.seconds:
                record["memory"][method] = _memory(name, method, args)
                keep(record)
        log(f"[{name}] peak memory: {record['memory']}")
    return record


def _costs(record: dict, rounds: _timing.Rounds) -> None:
    record["timing"] = rounds.to_dict()
    if "gradient" in rounds.seconds:
        record["in_gradients"] = rounds.in_gradients("gradient", "median")
        record["in_gradients_min"] = rounds.in_gradients("gradient", "min")


def _warm(products, *args):
    """Run a method once on one vector (what fails, fails here) and return it. The rounds still start with an
    untimed call of every method on all k vectors: the first call of k (its buffers, the pages they touch) cost
    3.5x the second for hessgap on GPT-2 at 4 × 256 tokens on a busy machine."""
    products(*args)
    return products


def _stage(record: dict, stage: str, fn, log):
    """Run one stage of a configuration; what it raises goes into the record, never out of it."""
    try:
        return fn()
    except Exception as error:
        record.setdefault("errors", {})[stage] = _timing.describe_error(error)
        log(f"[{record['config']}] {stage} raised {record['errors'][stage]}")
        return None


def _memory(name: str, method: str, args) -> dict:
    try:
        return _timing.peak_memory(memory_setup, name, args.size, method, args.k, args.curvlinops_block,
                                   args.device, threads=args.threads, device=args.device)
    except Exception as error:
        return {"error": _timing.describe_error(error)}


# ---- the run ---------------------------------------------------------------------------------------------------------

def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load(path: str | None, args) -> dict:
    if not path or not os.path.exists(path):
        return {"configs": {}}
    with open(path) as handle:
        report = json.load(handle)
    for name, record in report["configs"].items():
        if record.get("status") == "running" and record.get("interrupted"):  # twice: do not run into it again
            record.update(status="done", error="the run stopped twice while measuring it (a crash, killed for memory, "
                                               "or stopped by hand); delete its entry to measure it again")
        elif record.get("status") == "running":  # stopped inside it once: measured again
            record["interrupted"] = True
        elif record.get("size") not in (None, args.size):
            raise SystemExit(f"{path} holds {name} at size {record['size']}, not {args.size}: use another --json")
    return report


def save(path: str | None, report: dict) -> None:
    if path:
        temporary = path + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(report, handle, indent=1)
        os.replace(temporary, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(zoo_models.CONFIGS), choices=list(zoo_models.CONFIGS),
                        metavar="NAME", help="configurations (default: all): " + ", ".join(zoo_models.CONFIGS))
    parser.add_argument("--size", choices=zoo_models.SIZES, default="bench")
    parser.add_argument("--k", type=int, default=16, help="vectors per product (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; medians (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--clock", choices=sorted(_timing.CLOCKS), default="process",
                        help="process: CPU seconds of this process (steadier on a shared machine with one thread)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline-vectors", type=int, default=4, help="vectors timed for the retained graph")
    parser.add_argument("--curvlinops-block", type=int, default=8, help="columns per curvlinops matmat")
    parser.add_argument("--check-vectors", type=int, default=2, help="vectors of the float64 exactness check")
    parser.add_argument("--skip", nargs="*", default=[], choices=["retained_graph", "curvlinops"])
    parser.add_argument("--no-memory", action="store_true", help="leave out the peak-memory children")
    parser.add_argument("--json", help="save every configuration here as it finishes; a rerun skips those")
    parser.add_argument("--results", help="write the table into this RESULTS.md as its 'Model zoo' section")
    parser.add_argument("--table-only", action="store_true", help="render the table from --json, measure nothing")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    _timing.set_threads(args.threads)
    report = load(args.json, args)
    command = "python benchmarks/zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.table_only:
        run = {"command": command, "machine": _timing.machine(args.device), "commit": commit(),
               "date": datetime.date.today().isoformat()}
        # the first run's settings head the table; a resumed or partial rerun is listed after it
        report.setdefault("meta", {**run, "size": args.size, "k": args.k, "rounds": args.rounds, "clock": args.clock,
                                   "baseline_vectors": args.baseline_vectors, "curvlinops_block": args.curvlinops_block,
                                   "versions": {p: _timing.version(p) for p in
                                                ("transformers", "timm", "curvlinops-for-pytorch", "torchvision")}})
        report.setdefault("runs", []).append(run)
        save(args.json, report)  # with the runs and what load() found of interrupted configurations
        print(_timing.describe_machine(run["machine"]), flush=True)
        for name in args.models:
            previous = report["configs"].get(name, {})
            if previous.get("status") == "done" and not previous.get("retry"):
                print(f"[{name}] measured already in {args.json}: skipped", flush=True)
                continue
            interrupted = {"interrupted": True} if previous.get("interrupted") else {}

            def keep(record, name=name, interrupted=interrupted):
                report["configs"][name] = {**record, **interrupted, "status": "running"}
                save(args.json, report)

            keep({"config": name, "size": args.size})
            record = measure(name, args, lambda line: print(line, flush=True), keep)
            report["configs"][name] = {**record, "status": "done"}
            save(args.json, report)
    table = render(report)
    print(table, flush=True)
    if args.results:
        write_results(args.results, table, report.get("meta", {}).get("size", args.size))
    return report


if __name__ == "__main__":
    main()
