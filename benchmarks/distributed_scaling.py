"""Data-parallel scaling of hessgap's measurements: 1 rank × 1 thread against N ranks × 1 thread, side by side.

On an F1-sized network (784 → 5 × [Linear 512, BatchNorm, ReLU] → 10, 1.46M parameters) over ``--samples``
samples (8192 by default, random inputs and labels: the cost does not depend on their values), each
configuration times, in fresh gloo processes (one torch thread each):

- one batched Hessian-vector product at k = 16 (``hessgap.hvp``);
- Lanczos top-5 (``hessgap.eigenvalues``), with a fixed number of steps so both runs do the same work;
- one sharpness call (``hessgap.sharpness``, ε = 1e-3, the default solver).

Scaling efficiency = T(1 rank) / (N · T(N ranks)); 100 % is perfect. On a shared machine run it when the
cores are otherwise idle (N ranks need N free cores). With ``--backend nccl`` on a GPU machine (world size
1 by default there) it also reports the share of an HVP pass spent in the all-reduce.

    python benchmarks/distributed_scaling.py [--ranks 2] [--samples 8192] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile

import torch
from torch import nn


def f1_network() -> nn.Sequential:
    blocks: list[nn.Module] = []
    width = 784
    for _ in range(5):
        blocks += [nn.Linear(width, 512), nn.BatchNorm1d(512), nn.ReLU()]
        width = 512
    return nn.Sequential(*blocks, nn.Linear(width, 10)).eval()


def _worker(rank, world_size, init_file, samples, batch, repeats, backend, queue):
    import torch.distributed as dist

    import hessgap

    import _timing

    _timing.set_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    model = f1_network().to(device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 784, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    bounds = torch.tensor_split(torch.arange(samples), world_size)[rank]
    xs, ys = x[bounds], y[bounds]
    data = [(xs[i : i + batch].to(device), ys[i : i + batch].to(device)) for i in range(0, len(xs), batch)]
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(16, n, generator=torch.Generator().manual_seed(2)).to(device)

    clock = _timing.Clock("wall", device)

    def timed(fn):
        def synchronized():  # every rank starts and ends together: the slowest rank's time counts
            dist.barrier()
            fn()
            dist.barrier()
        return min(_timing.repeat(synchronized, repeats, clock))

    times = {
        "hvp k=16": timed(lambda: hessgap.hvp(model, data, V)),
        "lanczos top-5 (12 steps)": timed(lambda: hessgap.eigenvalues(model, data, k=5, max_iter=12, tol=1e-12)),
        "sharpness (eps 1e-3)": timed(lambda: hessgap.sharpness(model, data, epsilon=1e-3)),
    }
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def run(world_size: int, samples: int, batch: int, repeats: int, backend: str) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        processes = [context.Process(target=_worker, args=(r, world_size, init_file, samples, batch, repeats,
                                                           backend, queue)) for r in range(world_size)]
        for p in processes:
            p.start()
        times = queue.get()
        for p in processes:
            p.join()
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--json")
    args = parser.parse_args()
    one = run(1, args.samples, args.batch, args.repeats, args.backend)
    many = run(args.ranks, args.samples, args.batch, args.repeats, args.backend)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "samples": args.samples, "ranks": args.ranks, "backend": args.backend, "rows": []}
    print(f"{'measurement':28s} {'1 rank s':>10s} {f'{args.ranks} ranks s':>11s} {'efficiency':>11s}")
    for name in one:
        efficiency = one[name] / (args.ranks * many[name])
        report["rows"].append({"measurement": name, "one_rank_s": one[name], "ranks_s": many[name],
                               "efficiency": efficiency})
        print(f"{name:28s} {one[name]:10.3f} {many[name]:11.3f} {100 * efficiency:10.1f}%")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
