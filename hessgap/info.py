"""``python -m hessgap.info``: what this installation of hessgap was built with."""

from __future__ import annotations

import json
import os
import sys

import torch

from . import __version__, _extension


def _registered_ops() -> list[str]:
    # torch.ops.hessgap fills lazily, so ask the dispatcher for every op the library registered
    names = torch._C._dispatch_get_all_op_names()
    return sorted({name.split("::", 1)[1].split(".", 1)[0] for name in names if name.startswith("hessgap::")})


def build_info() -> dict:
    module = _extension.load()
    info = {
        "hessgap": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": module is not None,
        "cpu_kernels": module is not None,
        "cuda_kernels": bool(module is not None and module.with_cuda),
        "cuda_architectures": (module.cuda_archs or "torch default") if module is not None and module.with_cuda else None,
        "openmp": bool(module is not None and module.built_with_openmp),
        "cuda_device_available": torch.cuda.is_available(),
        "ops": _registered_ops() if module else [],
    }
    if module is None:
        info["extension_error"] = str(_extension.load_error())
    return info


def main(argv=None) -> int:
    info = build_info()
    argv = sys.argv[1:] if argv is None else argv
    if "--json" in argv:
        text = json.dumps(info, indent=2)
    else:
        text = "\n".join(f"{key:22s} {value}" for key, value in info.items())
    try:
        print(text)
        sys.stdout.flush()  # a reader that stopped early shows up here rather than at exit
    except BrokenPipeError:  # `python -m hessgap.info | head -1`: the reader has what it wanted
        # stdout still holds unwritten text: point it at /dev/null so the flush at exit fails no more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
