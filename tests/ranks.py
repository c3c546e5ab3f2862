"""Run a function on several gloo ranks in fresh processes, for the distributed tests.

``run_ranks(worker, world_size, *args)`` starts ``world_size`` processes, each joining one gloo process
group and calling ``worker(rank, world_size, *args)``; it returns every rank's return value in rank order,
or raises with every failing rank's traceback. A worker must be a module-level function of an importable
module (the processes are spawned, not forked), e.g. one of tests/rank_workers.py.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tempfile
import traceback
from pathlib import Path


def _entry(rank, world_size, init_file, out_dir, worker, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    outcome = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            outcome["value"] = worker(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        outcome["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
        pickle.dump(outcome, handle)


def run_ranks(worker, world_size: int, *args, timeout: float = 240.0) -> list:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        processes = [context.Process(target=_entry, args=(r, world_size, init_file, tmp, worker, args))
                     for r in range(world_size)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout)
        hung = [r for r, p in enumerate(processes) if p.is_alive()]
        for p in processes:
            if p.is_alive():
                p.kill()
        if hung:
            raise AssertionError(f"ranks {hung} did not finish within {timeout} s (a collective hangs?)")
        outcomes = []
        for r in range(world_size):
            path = Path(tmp) / f"rank{r}.pkl"
            if not path.exists():
                raise AssertionError(f"rank {r} exited with code {processes[r].exitcode} without a result")
            outcomes.append(pickle.loads(path.read_bytes()))
    errors = [f"--- rank {r} ---\n{o['error']}" for r, o in enumerate(outcomes) if "error" in o]
    if errors:
        raise AssertionError("\n".join(errors))
    return [o["value"] for o in outcomes]
