"""How much memory a device has free, for the calls that choose between holding and recomputing."""

from __future__ import annotations

import torch


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
