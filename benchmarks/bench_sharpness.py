"""Peak extra memory of hessgap.sharpness on a model with ≥ 20M parameters (random subspace, p = 100).

The figure to reach (issue 2): subspace sharpness with p = 100 on a model with ≥ 20M parameters uses
at most 4× the parameters' bytes of extra memory, i.e. A (n × p, 100× the parameters) is never held.

How it is measured, two ways, each case in a fresh Python process that builds the model and its data:

- tensors: the call runs under ``torch.profiler.profile(profile_memory=True)``; the largest "Total
  Allocated" of its ``[memory]`` events is the peak of bytes held by tensors allocated inside the call
  (the centre snapshot, gradients, autograd buffers, blocks of A);
- process (a second fresh process, no profiler): resident set size from /proc/self/statm before the
  call, against the process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after it: what
  the operating system saw, including the one-time workspaces of the first backward pass. glibc's
  malloc is run with ``MALLOC_MMAP_THRESHOLD_=1 MiB``, so that freed tensors of a MiB or more go back
  to the system at once (by default its threshold grows up to 32 MiB and the RSS keeps freed blocks).

    python benchmarks/bench_sharpness.py                    # subspace p = 100 and full space, 21M params
    python benchmarks/bench_sharpness.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import _timing

WIDTH = 4096


def _tensor_peak(prof) -> int:
    """Peak of the bytes held by tensors allocated inside the profiled call (torch's allocator events)."""
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as fh:
        events = json.load(fh)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def _child(case: str, mode: str, iterations: int, samples: int) -> dict:
    import torch
    from torch import nn

    import hessgap

    _timing.set_threads(1)  # a loaded 2-core machine runs one thread much faster than two
    torch.manual_seed(0)
    # 1024 → 4096 → 4096 → 10: 21.0M float32 parameters (84 MB)
    model = nn.Sequential(nn.Linear(1024, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    inputs, targets = torch.randn(samples, 1024), torch.randint(0, 10, (samples,))
    loader = [(inputs[i : i + 64], targets[i : i + 64]) for i in range(0, samples, 64)]
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    # the streaming mode (A regenerated block by block), whose memory is the bounded one; by default A is
    # held instead when it takes at most a quarter of the free memory (8 GiB here: more than that)
    options = dict(subspace_dim=100, subspace_memory_bytes=0) if case == "subspace" else {}
    before = _timing.resident_bytes()
    with _timing.stopwatch() as watch:
        if mode == "tensors":
            activities = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
                result = hessgap.sharpness(model, loader, max_iter=iterations, **options)
            extra = _tensor_peak(prof)
        else:  # the process's peak resident set
            result = hessgap.sharpness(model, loader, max_iter=iterations, **options)
            extra = _timing.peak_resident_bytes() - before
    seconds = watch.seconds
    return {
        "case": case,
        "mode": mode,
        "parameters": params,
        "parameter_bytes": param_bytes,
        "extra_bytes": extra,
        "extra_over_parameters": extra / param_bytes,
        "seconds": seconds,
        "result": result.to_dict(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--cases", default="subspace,full")
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, mode = args.child.split(":")
        print(json.dumps(_child(case, mode, args.iterations, args.samples)))
        return
    results = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(_timing.MALLOC_MMAP_THRESHOLD))  # see the module docstring
    for case in args.cases.split(","):
        for mode in ("tensors", "rss"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", f"{case}:{mode}", "--iterations", str(args.iterations),
                 "--samples", str(args.samples)],
                check=True, capture_output=True, text=True, env=env,
            )
            record = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(record)
            mib = 2**20
            print(
                f"{case:9s} {mode:8s}: {record['parameters'] / 1e6:.1f}M parameters "
                f"({record['parameter_bytes'] / mib:.0f} MiB), peak extra {record['extra_bytes'] / mib:.0f} MiB = "
                f"{record['extra_over_parameters']:.2f}x the parameters' bytes, "
                f"{record['result']['evaluations']} evaluations in {record['seconds']:.1f}s, "
                f"value {record['result']['value']:.4g}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.machine(), "cores": os.cpu_count(), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
