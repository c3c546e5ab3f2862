"""The demo's recorded numbers: what they depend on, and replaying a recorded configuration.

``benchmarks/regenerate_docs.py`` runs ``hessgap demo`` and a small configuration of the same code path,
and records what they printed in ``benchmarks/demo_reference.json`` with the platform they ran on. On the
same platform the numbers must come out the same (the demo trains on one thread from fixed seeds), so a
test replays the small configuration (:func:`replay`) and compares its printed lines with the record;
on another platform (another torch, another CPU instruction set) it cannot expect the same digits.
"""

from __future__ import annotations

import platform

import torch

from .._io import read_json
from ..errors import HessgapError
from .demo import summary_lines
from .presets import Settings
from .runs import RunFolder

#: what the printed numbers depend on beyond the code: the platform a record is compared on
PLATFORM_KEYS = ("machine", "system", "torch", "cpu_capability", "threads")


def platform_stamp(threads: int = 1) -> dict:
    """The platform a run's numbers depend on (:data:`PLATFORM_KEYS`) and, for the record, what else it ran with."""
    import numpy
    import scipy
    import sklearn

    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def same_platform(recorded: dict, current: dict) -> list[str]:
    """The platform keys on which ``recorded`` and ``current`` differ, as "key: recorded vs current"."""
    return [f"{key}: {recorded.get(key)!r} recorded, {current.get(key)!r} here"
            for key in PLATFORM_KEYS if recorded.get(key) != current.get(key)]


def load_record(path) -> dict:
    """A record written by ``benchmarks/regenerate_docs.py``."""
    record = read_json(path)
    if "platform" not in record or "runs" not in record:
        raise HessgapError(f"{path} is not a demo record (no 'platform' or 'runs'); rerun benchmarks/regenerate_docs.py")
    return record


def replay(settings: dict, out_dir, threads: int = 1) -> list[str]:
    """Run the demo's experiments with ``settings`` (a :meth:`Settings.to_dict`) into ``out_dir`` on
    ``threads`` torch threads, as ``hessgap demo`` does, and return the lines it would print."""
    from . import reproduce

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chosen = Settings.from_dict(settings)
        with RunFolder(out_dir, "demo", chosen.to_dict(), progress=False).open() as folder:
            return summary_lines(reproduce(folder, chosen))
    finally:
        torch.set_num_threads(before)
