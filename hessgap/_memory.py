"""How much memory a device has free, for the calls that choose between holding and recomputing."""

from __future__ import annotations

import math
import re

import torch

from .errors import HessgapError


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes free on ``device`` now (CPU: the kernel's MemAvailable; CUDA: the driver's free memory), or None
    where the platform does not say (then callers keep their conservative default)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_bytes(value, name: str = "max_memory") -> int:
    """A memory size: a positive number of bytes, or a string such as "8GB" (10⁹), "512MiB" (2²⁰), "1.5 G"."""
    hint = f'{name} must be a positive number of bytes or a size such as "8GB" or "512MiB"'
    if isinstance(value, bool):
        raise HessgapError(f"{hint}, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise HessgapError(f"{hint}, got {value!r}")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise HessgapError(f"{hint}, got {type(value).__name__}")
    if not math.isfinite(number) or number < 1:
        raise HessgapError(f"{hint}, got {value!r}")
    return int(number)
