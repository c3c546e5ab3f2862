"""Second-order autograd through the models people train: attention on kernels that have the rules, and a
clear error naming any other op that has none.

PyTorch's fused attention kernels (flash, memory-efficient, and the CPU flash kernel behind
``torch.nn.functional.scaled_dot_product_attention``) have no double-backward and no forward-mode rule, so a
Hessian-vector product through a transformer fails inside autograd. :func:`second_order_rules` routes every
such call to PyTorch's math implementation (plain matmul and softmax, which have all the rules) for the
duration of a curvature call, and says so in the call's notes. First-order work (sharpness) does not use
it and keeps the fast kernels.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..errors import HessgapError

ATTENTION_NOTE = (
    "scaled_dot_product_attention ran on PyTorch's math kernels: its fused kernels have no double-backward rule"
)
_MISSING_RULE = re.compile(r"(?:forward AD with|derivative for) '?([\w:.]+)'?")


class _AttentionWatch(TorchFunctionMode):
    """Counts calls of scaled_dot_product_attention (the model may call it through the functional API)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


class SecondOrderRules:
    """The context of one curvature call: ``with rules.active():`` around the passes, ``with rules.watch():``
    around a forward whose attention calls should be noted; ``notes`` lists what was rerouted."""

    def __init__(self):
        self.notes: list[str] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with sdpa_kernel([SDPBackend.MATH]):
            try:
                yield
            except (RuntimeError, NotImplementedError) as exc:
                op = missing_rule(exc)
                if op is None:
                    raise
                raise HessgapError(
                    f"the model uses {op}, which has no second-order rule in PyTorch, so its Hessian cannot be "
                    "formed through it. Replace it by an equivalent made of differentiable ops (hessgap already "
                    "routes scaled_dot_product_attention to PyTorch's math kernels; Hugging Face models also take "
                    "attn_implementation='eager'), or leave its parameters out with params=..."
                ) from exc

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        with _AttentionWatch() as watch:
            yield
        if watch.calls and ATTENTION_NOTE not in self.notes:
            self.notes.append(ATTENTION_NOTE)


def missing_rule(exc: BaseException) -> str | None:
    """The op an autograd error says has no (higher-order or forward-mode) derivative, or None."""
    match = _MISSING_RULE.search(str(exc))
    return match.group(1) if match else None
