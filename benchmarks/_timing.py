"""The one timing module of hessgap's benchmarks: clocks, interleaved rounds, costs in gradients, thread
pinning, peak memory in a fresh process, and the machine a figure was measured on.

Every benchmark script imports what it needs from here (``benchmarks/`` is the script's own folder, so
``import _timing`` works when a script runs as ``python benchmarks/<script>.py``; pytest puts the folder on
its path too):

- :class:`Clock`: ``"wall"`` (``time.perf_counter``) or ``"process"`` (``time.process_time``: this process's
  CPU seconds, which other jobs on a shared machine disturb far less with one torch thread); on CUDA it
  synchronizes the device around each reading and is always wall time.
- :func:`interleaved`: several methods timed in alternating rounds (machine noise hits all alike), each
  method's seconds per round divided by the units it covers (vectors, steps); :class:`Rounds` gives the
  medians and minima, and the costs as multiples of a "gradient" method timed in the same rounds
  (:meth:`Rounds.in_gradients`).
- :func:`set_threads`: pin torch's CPU threads (one by default in the scripts: on a busy 2-core machine one
  thread was many times faster and much steadier than two).
- :func:`peak_memory`: the peak memory of one method run in a fresh process started with multiprocessing's
  spawn: resident set size above the process's model+data baseline (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``, else ``getrusage``'s ``ru_maxrss``), and on CUDA ``max_memory_allocated``
  above what was allocated before.
- :func:`machine`: the CPU, cores, torch version, threads, CUDA device and load average, for RESULTS.md.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
#: glibc returns freed blocks of at least this many bytes to the system at once, so that the resident set of
#: a memory child follows its live tensors (by default the threshold grows to 32 MiB and RSS keeps them).
MALLOC_MMAP_THRESHOLD = 1 << 20


# ---- clocks ------------------------------------------------------------------------------------------------

class Clock:
    """A clock for timing calls: ``"wall"`` or ``"process"`` seconds; on a CUDA device, synchronized wall time."""

    def __init__(self, kind: str = "wall", device: torch.device | str | None = None):
        if kind not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {kind!r}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # CPU seconds of this process say nothing about a GPU's work
        self.kind = "wall" if self.device.type == "cuda" else kind
        self._read = CLOCKS[self.kind]

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self._read()

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds of one call of ``fn``."""
        start = self.now()
        fn()
        return self.now() - start

    def __repr__(self) -> str:
        return f"Clock({self.kind!r}, device={str(self.device)!r})"


def timed(fn: Callable[[], object], clock: Clock | str = "wall") -> float:
    """Seconds of one call of ``fn`` on ``clock`` (a :class:`Clock` or a clock's name)."""
    return (clock if isinstance(clock, Clock) else Clock(clock)).time(fn)


@contextlib.contextmanager
def stopwatch(clock: Clock | str = "wall"):
    """``with stopwatch() as watch: ...`` then ``watch.seconds``: the seconds the block took."""
    clock = clock if isinstance(clock, Clock) else Clock(clock)
    watch = _Watch()
    start = clock.now()
    try:
        yield watch
    finally:
        watch.seconds = clock.now() - start


class _Watch:
    seconds: float = float("nan")


def wall_and_process(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``(fn(), wall seconds, CPU seconds of this process)``: on a shared machine the CPU time is the steadier."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def repeat(fn: Callable[[], object], repeats: int, clock: Clock | str = "wall", warmup: int = 0) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    clock = clock if isinstance(clock, Clock) else Clock(clock)
    for _ in range(warmup):
        fn()
    return [clock.time(fn) for _ in range(repeats)]


# ---- interleaved rounds -------------------------------------------------------------------------------------

@dataclass
class Rounds:
    """Seconds per unit of each method, one figure per round, and the methods that raised (their error)."""

    clock: str = "wall"
    seconds: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, method: str, seconds: float | None) -> None:
        """Record one round's figure (None: not measured in this round)."""
        if seconds is not None:
            self.seconds.setdefault(method, []).append(float(seconds))

    def median(self, method: str) -> float:
        return statistics.median(self.seconds[method])

    def min(self, method: str) -> float:
        return min(self.seconds[method])

    def stat(self, method: str, how: str = "median") -> float:
        return self.min(method) if how == "min" else self.median(method)

    def medians(self) -> dict[str, float]:
        return {key: self.median(key) for key in self.seconds}

    def minima(self) -> dict[str, float]:
        return {key: self.min(key) for key in self.seconds}

    def in_gradients(self, unit: str = "gradient", how: str = "median") -> dict[str, float]:
        """Every other method's cost as a multiple of ``unit``'s (one forward + backward of the same batch,
        timed in the same rounds): machine speed and steady load cancel."""
        base = self.stat(unit, how)
        return {key: self.stat(key, how) / base for key in self.seconds if key != unit}

    def last(self) -> dict[str, float]:
        return {key: values[-1] for key, values in self.seconds.items()}

    def to_dict(self) -> dict:
        return {"clock": self.clock, "seconds_per_round": self.seconds, "median": self.medians(),
                "min": self.minima(), "errors": self.errors}


def interleaved(methods: dict[str, Callable[[], object]], rounds: int, *, clock: Clock | str = "wall",
                per: dict[str, float] | None = None, warmup: int = 1, keep_going: bool = False,
                on_round: Callable[[int, Rounds], None] | None = None) -> Rounds:
    """Time every method once per round, in turn, for ``rounds`` rounds (after ``warmup`` untimed calls each).

    ``per[name]`` divides that method's seconds (the vectors or steps one call covers: seconds per unit).
    With ``keep_going`` a method that raises is recorded in ``Rounds.errors`` (type and message) and left
    out of the later rounds instead of stopping the whole measurement. ``on_round(index, rounds)`` is called
    after each round (to print progress).
    """
    clock = clock if isinstance(clock, Clock) else Clock(clock)
    per = per or {}
    result = Rounds(clock=clock.kind)
    live = dict(methods)

    def attempt(name, action):
        try:
            return action()
        except Exception as error:
            if not keep_going:
                raise
            result.errors[name] = describe_error(error)
            live.pop(name, None)
            return None

    for name, fn in list(live.items()):
        for _ in range(warmup):
            attempt(name, fn)
    for index in range(rounds):
        for name, fn in list(live.items()):
            seconds = attempt(name, lambda fn=fn: clock.time(fn))
            result.add(name, None if seconds is None else seconds / per.get(name, 1))
        if on_round is not None:
            on_round(index, result)
    return result


def describe_error(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (cut to ``limit`` characters), for a table cell or a footnote."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- threads --------------------------------------------------------------------------------------------------

def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op CPU threads (None: leave torch's choice); returns the number in force."""
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


@contextlib.contextmanager
def threads(count: int | None):
    """Pin torch's CPU threads for a block, restoring the previous number after it."""
    before = torch.get_num_threads()
    set_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- peak memory in a fresh process ---------------------------------------------------------------------------

def resident_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    return _status_bytes("VmRSS") or 0


def reset_peak_resident() -> bool:
    """Reset this process's peak resident set (VmHWM) to its current size; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes() -> int:
    """This process's peak resident set size: VmHWM, or ``ru_maxrss`` (KiB on Linux) where /proc is missing."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _memory_child(setup, args, threads_, device, connection) -> None:
    """The spawned process: ``run = setup(*args)`` builds the model and data (and warms the method up), then
    the resident set (and CUDA allocation) above that baseline while ``run()`` runs is sent back."""
    try:
        set_threads(threads_)
        run = setup(*args)
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        reset = reset_peak_resident()
        baseline = resident_bytes() if reset else peak_resident_bytes()
        run()
        out = {"bytes": peak_resident_bytes() - baseline, "baseline_bytes": baseline,
               "how": "VmHWM above VmRSS before the call" if reset else "ru_maxrss above the peak before the call"}
        if cuda:
            torch.cuda.synchronize()
            out["cuda_bytes"] = torch.cuda.max_memory_allocated() - cuda_before
        connection.send(("ok", out))
    except BaseException as error:  # noqa: B036 - everything goes back to the parent, which decides
        connection.send(("error", describe_error(error), traceback.format_exc(limit=6)))
    finally:
        connection.close()


def peak_memory(setup: Callable[..., Callable[[], object]], *args, threads: int | None = 1,
                device: str | None = None, timeout: float | None = 3600) -> dict:
    """Peak memory of one method, measured in a fresh process (multiprocessing spawn).

    ``setup`` is a module-level function (the child imports it by name): ``setup(*args)`` builds the model and
    its data, runs whatever one-time work the method does (captures, warm-up), and returns ``run``, the call to
    measure. Returns ``{"bytes": peak RSS above the baseline, "baseline_bytes", "how"}``, plus ``"cuda_bytes"``
    (``max_memory_allocated`` above the allocation before ``run``) on CUDA. Raises RuntimeError with the
    child's error when it fails, dies or runs past ``timeout`` seconds.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)  # the child's malloc reads it at start
    try:
        child = context.Process(target=_memory_child, args=(setup, args, threads, device, send))
        child.start()
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    send.close()
    try:
        if not receive.poll(timeout):
            child.kill()
            raise RuntimeError(f"the memory child ran past {timeout} s and was stopped")
        message = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"the memory child died (exit code {child.exitcode}: killed for memory?)") from None
    finally:
        child.join(timeout=30)
        receive.close()
    if message[0] != "ok":
        raise RuntimeError(f"in the memory child: {message[1]}")
    return message[1]


# ---- the machine ------------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> dict:
    """What a figure was measured on: CPU, cores, torch, threads, CUDA device, load average at the call."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": f"{platform.machine()} {platform.system()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: dict | None = None) -> str:
    """One line for RESULTS.md: 'AMD EPYC (2 cores), torch 2.14.1, 1 thread, load average 5.1'."""
    info = info or machine()
    line = f"{info['cpu']} ({info['cores']} cores), torch {info['torch']}, {info['threads']} torch thread(s)"
    if info.get("cuda_device"):
        line += f", {info['cuda_device']}"
    if info.get("load_average"):
        line += f", load average {info['load_average'][0]:.1f} at the start"
    return line


def version(package: str) -> str | None:
    """An installed distribution's version, or None."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(package)
    except PackageNotFoundError:
        return None
