"""Second-order autograd through the models people train: attention on kernels that have the rules, and a
clear error naming any other op that has none.

PyTorch's fused attention kernels (flash, memory-efficient, and the CPU flash kernel behind
``torch.nn.functional.scaled_dot_product_attention``) have no double-backward and no forward-mode rule, so a
Hessian-vector product through a transformer fails inside autograd. :func:`second_order_rules` routes every
such call to PyTorch's math implementation (plain matmul and softmax, which have all the rules) for the
duration of a curvature call, and says so in the call's notes. First-order work (sharpness) does not use
it and keeps the fast kernels.

Float16 models meet a second limit: the double backward of PyTorch's normalization layers (layer_norm,
group_norm, rms_norm, batch_norm in train mode) forms 1/σ³, which overflows float16 (max 65504) once a
feature's standard deviation is below about 0.025, as it is for GPT-2's embeddings at initialization.
For float16 tensors these functions run in float32 inside a curvature call (their input and parameters
cast up, the output cast back: the forward is float16's to rounding, as under autocast), and the notes say
so. bfloat16 has float32's range and needs none of it.

A custom ``torch.autograd.Function`` whose backward is marked ``@once_differentiable`` is worse than an
op without a rule: PyTorch raises nothing, and the gradient's graph simply ends there, so the Hessian
silently misses every term through it. :func:`check_differentiable` finds that end in the gradient's graph
and raises, naming the Function.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..errors import HessgapError

ATTENTION_NOTE = (
    "scaled_dot_product_attention ran on PyTorch's math kernels: its fused kernels have no double-backward rule"
)
NORMALIZATION_NOTE = (
    "normalization layers of float16 tensors ran in float32: PyTorch's float16 double backward of "
    "normalization overflows (it forms 1/σ³)"
)
_MISSING_RULE = re.compile(r"(?:forward AD with|derivative for) '?([\w:.]+)'?")
#: Normalizations whose float16 double backward overflows (see the module docstring).
_NORMALIZATIONS = {F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm}
if hasattr(F, "rms_norm"):  # torch >= 2.4
    _NORMALIZATIONS.add(F.rms_norm)


def _cast(value, dtype_from: torch.dtype, dtype_to: torch.dtype):
    if isinstance(value, torch.Tensor) and value.dtype == dtype_from:
        return value.to(dtype_to)
    return value


class _ForwardWatch(TorchFunctionMode):
    """Sees every torch function of a forward: counts scaled_dot_product_attention calls (the model may call
    it through the functional API) and runs float16 normalizations in float32."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.upcast = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        elif func in _NORMALIZATIONS and args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float16:
            self.upcast += 1
            args = tuple(_cast(a, torch.float16, torch.float32) for a in args)
            kwargs = {k: _cast(v, torch.float16, torch.float32) for k, v in kwargs.items()}
            return _cast(func(*args, **kwargs), torch.float32, torch.float16)
        return func(*args, **kwargs)


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
                forward = op.removesuffix("_backward")
                what = f"{forward}, whose backward ({op}) has no derivative" if forward != op else (
                    f"{op}, which has no second-order rule")
                raise HessgapError(
                    f"the model uses {what} in PyTorch, so its Hessian cannot be "
                    "formed through it. Replace it by an equivalent made of differentiable ops (hessgap already "
                    "routes scaled_dot_product_attention to PyTorch's math kernels; Hugging Face models also take "
                    "attn_implementation='eager'), or leave its parameters out with params=..."
                ) from exc

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        with _ForwardWatch() as watch:
            yield
        if watch.calls:
            self.note(ATTENTION_NOTE)
        if watch.upcast:
            self.note(NORMALIZATION_NOTE)

    def note(self, text: str) -> None:
        """Add ``text`` to the notes once."""
        if text not in self.notes:
            self.notes.append(text)


def _graph(roots) -> Iterator:
    """Every autograd node reachable from ``roots`` (each once)."""
    seen, stack = set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None)


def _once_differentiable(node) -> bool:
    backward = getattr(getattr(node, "_forward_cls", None), "backward", None)
    code = getattr(backward, "__code__", None)
    return code is not None and code.co_name == "wrapper" and code.co_filename == _FUNCTION_FILE


_FUNCTION_FILE = torch.autograd.function.__file__


def check_differentiable(loss: torch.Tensor, grads) -> None:
    """Raise when the gradient's graph ends in a once-differentiable backward (see the module docstring)."""
    if not any(node.name() == "torch::autograd::Error" for node in _graph(g.grad_fn for g in grads if g is not None)):
        return
    names = sorted({node._forward_cls.__name__ for node in _graph([loss.grad_fn]) if _once_differentiable(node)})
    what = ", ".join(names) if names else "a custom autograd Function"
    raise HessgapError(
        f"the model uses {what}, whose backward is marked @once_differentiable: the gradient is not differentiable "
        "through it and its Hessian terms would be silently lost. Give it a backward made of differentiable ops "
        "(without @once_differentiable), or leave the parameters before it out with params=..."
    )


def missing_rule(exc: BaseException) -> str | None:
    """The op an autograd error says has no (higher-order or forward-mode) derivative, or None."""
    match = _MISSING_RULE.search(str(exc))
    return match.group(1) if match else None
