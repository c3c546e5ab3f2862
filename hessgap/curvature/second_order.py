"""Second-order autograd through the models people train: attention on kernels that have the rules, compiled
modules run eagerly, and a clear error naming any other op that has none, where the model calls it and what
to do.

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

PyTorch's double backward of its fused weight-norm kernel (``torch._weight_norm``, behind ``weight_norm``
parametrizations that normalize along the first or last dimension) is wrong: its Hessian disagrees with finite
differences of its own gradient. Inside a curvature call the weight norm runs as g·v/‖v‖ in plain ops (the same
values), and the notes say so.

``torch.compile``'d modules and functions cannot be differentiated twice (AOTAutograd has no double backward),
while the original module they wrap computes the very same function eagerly: inside a curvature call every
compiled region runs eagerly (``torch.compiler.set_stance("force_eager")``), and the notes say so when the
model holds compiled modules. Its products are then the original module's, bit for bit.

Any other op without a second derivative in PyTorch (``hardsigmoid``, ``embedding_bag``, ``cdist``, ...) makes
the call raise a HessgapError naming the op, the modules that call it (:func:`modules_calling` reruns the
failing batch's forward with its ATen ops watched) and what to do.

A custom ``torch.autograd.Function`` whose backward is marked ``@once_differentiable`` is worse than an
op without a rule: PyTorch raises nothing, and the gradient's graph simply ends there, so the Hessian
silently misses every term through it. :func:`check_differentiable` finds that end in the gradient's graph
and raises, naming the Function.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import HessgapError

ATTENTION_NOTE = (
    "scaled_dot_product_attention ran on PyTorch's math kernels: its fused kernels have no double-backward rule"
)
COMPILED_NOTE = (
    "the torch.compile'd modules ran eagerly (their original modules: the same function): compiled graphs cannot be "
    "differentiated twice"
)
NORMALIZATION_NOTE = (
    "normalization layers of float16 tensors ran in float32: PyTorch's float16 double backward of "
    "normalization overflows (it forms 1/σ³)"
)
WEIGHT_NORM_NOTE = (
    "weight_norm ran as g·v/‖v‖ in plain ops: PyTorch's double backward of its fused weight-norm kernel gives a wrong "
    "Hessian"
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


def _weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """torch._weight_norm in ops whose double backward is right: the fused kernel's (weight_norm parametrizations
    with dim = 0 or the last dimension, on CPU in torch 2.13) disagrees with finite differences of its own
    gradient."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


class _ForwardWatch(TorchFunctionMode):
    """Sees every torch function of a forward: counts scaled_dot_product_attention calls (the model may call
    it through the functional API), runs float16 normalizations in float32 and weight norms in plain ops."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.upcast = 0
        self.weight_norms = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            self.weight_norms += 1
            return _weight_norm(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        elif func in _NORMALIZATIONS and args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float16:
            self.upcast += 1
            args = tuple(_cast(a, torch.float16, torch.float32) for a in args)
            kwargs = {k: _cast(v, torch.float16, torch.float32) for k, v in kwargs.items()}
            return _cast(func(*args, **kwargs), torch.float32, torch.float16)
        return func(*args, **kwargs)


class SecondOrderRules:
    """The context of one curvature call: ``with rules.active(model):`` around the passes, ``with rules.watch():``
    around a forward whose attention calls should be noted; ``notes`` lists what was rerouted."""

    def __init__(self):
        self.notes: list[str] = []

    @contextlib.contextmanager
    def active(self, model: nn.Module, locate: Callable[[str], list[str]] | None = None) -> Iterator[None]:
        """The passes of a curvature call on ``model``: attention on math kernels, compiled regions eager; an op
        without a second derivative becomes a HessgapError naming it, the modules that call it (``locate(op)``:
        their qualified names, when known) and what to do."""
        if is_compiled(model):
            self.note(COMPILED_NOTE)
        with sdpa_kernel([SDPBackend.MATH]), _eager():
            try:
                yield
            except (RuntimeError, NotImplementedError) as exc:
                if "does not currently support double backward" in str(exc):  # a torch without set_stance
                    raise HessgapError(
                        "the model holds torch.compile'd code, which torch cannot differentiate twice, and this torch "
                        f"({torch.__version__}) cannot run it eagerly for hessgap (torch >= 2.6 can): pass the "
                        "original module (model._orig_mod for torch.compile(model)) to the curvature calls"
                    ) from exc
                op = missing_rule(exc)
                if op is None:
                    raise
                forward = op.removesuffix("_backward")  # the op the forward calls, whose backward has no derivative
                modules = locate(forward) if locate is not None else []
                raise HessgapError(_missing_rule_message(op, modules, "forward AD" in str(exc))) from exc

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        with _ForwardWatch() as watch:
            yield
        if watch.calls:
            self.note(ATTENTION_NOTE)
        if watch.upcast:
            self.note(NORMALIZATION_NOTE)
        if watch.weight_norms:
            self.note(WEIGHT_NORM_NOTE)

    def note(self, text: str) -> None:
        """Add ``text`` to the notes once."""
        if text not in self.notes:
            self.notes.append(text)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is or holds a ``torch.compile``'d module (``torch.compile(m)`` or ``m.compile()``)."""
    return any(type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _eager():
    """Every torch.compile'd region runs eagerly inside this context (torch ≥ 2.6; before, compiled models raise)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


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


#: What to do about ops that real models use and PyTorch cannot differentiate twice, until hessgap has rules.
_REMEDIES = {
    "hardsigmoid": "Write it as torch.clamp(x / 6 + 0.5, 0, 1) (nn.Hardsigmoid's own formula, which autograd "
                   "differentiates twice), or restrict params= to the parameters after it in the forward",
    "embedding_bag": "Write it as nn.Embedding followed by .sum(1) or .mean(1) over each bag (EmbeddingBag's own "
                     "formula for mode='sum' / 'mean', which autograd differentiates twice), or leave its weight out "
                     "with params=... (the other parameters' Hessian needs no derivative through it)",
}
_GENERIC_REMEDY = (
    "Replace it by an equivalent made of differentiable ops, or leave out with params=... the parameters whose "
    "gradient passes through it (those before it in the forward)"
)
_ATTENTION_REMEDY = (
    " (hessgap already routes scaled_dot_product_attention to PyTorch's math kernels; Hugging Face models also take "
    "attn_implementation='eager')"
)


def op_name(op: str) -> str:
    """The name people know an ATen op by: ``aten::_embedding_bag_backward`` → ``embedding_bag_backward``."""
    return op.split("::")[-1].lstrip("_")


def _missing_rule_message(op: str, modules: list[str], forward_mode: bool = False) -> str:
    forward = op.removesuffix("_backward")
    name = op_name(forward)
    listed = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
    where = f" in {listed}" if modules else ""
    what = f"whose backward ({op}) has no derivative" if forward != op else "which has no second-order rule"
    if forward_mode:  # a forward-mode product (the Fisher–Rao norm's derivative along θ) met it
        what = "which has no forward-mode (jvp) rule"
    remedy = _REMEDIES.get(name, _GENERIC_REMEDY + (_ATTENTION_REMEDY if "attention" in name else ""))
    return (f"the model uses {name}{where}, {what} in PyTorch, so its {'derivatives along a direction' if forward_mode else 'Hessian'} "
            f"cannot be formed through it (hessgap has no rule of its own for it). {remedy}")


def modules_calling(model: nn.Module, forward: Callable[[], object], op: str) -> list[str]:
    """The modules of ``model`` that call the ATen op ``op`` while ``forward()`` runs (the innermost module running
    at each call), as ``"module qualified.name (Type)"``."""
    names = {id(m): f"module {name}" if name else "the model itself" for name, m in model.named_modules()}

    def stem(name: str) -> str:  # cdist's backward is _cdist_backward, its forward _cdist_forward
        return op_name(name).removesuffix("_forward")

    wanted, running, found = stem(op), [], []

    def enter(module, args) -> None:
        running.append(module)

    def leave(module, args, output) -> None:
        running.pop()

    handles = [hook for m in model.modules() for hook in (m.register_forward_pre_hook(enter),
                                                          m.register_forward_hook(leave))]

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if running and stem(func._schema.name) == wanted:
                label = f"{names[id(running[-1])]} ({type(running[-1]).__name__})"
                if label not in found:
                    found.append(label)
            return func(*args, **(kwargs or {}))

    try:
        with Calls():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return found


def missing_rule(exc: BaseException) -> str | None:
    """The op an autograd error says has no (higher-order or forward-mode) derivative, or None."""
    match = _MISSING_RULE.search(str(exc))
    return match.group(1) if match else None
