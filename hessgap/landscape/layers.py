"""How the layer-stack engine reads a network: which flat ``nn.Sequential`` networks it takes, and the ops it
runs them as (a layer with the BatchNorm it absorbs, a standalone BatchNorm, or a sample-by-sample module).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .plane import Plane

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PER_SAMPLE = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten,
)
# identities at evaluation: dropout is always off on a landscape
_SKIPPED = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# exact types only: a subclass may override forward
_KNOWN = frozenset(_LAYERS + _NORMS + _PER_SAMPLE + _SKIPPED)


def leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(state-name prefix, module) of every non-Sequential module, nested Sequentials walked in order."""
    found = []
    for name, child in module.named_children():
        if type(child) is nn.Sequential:
            found += leaves(child, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}.", child))
    return found


def _sample_ndim_after(module: nn.Module, ndim: int) -> int:
    """Dimensions of one sample after ``module`` (the batch dimension not counted)."""
    if isinstance(module, nn.Flatten):
        total = ndim + 1
        start, end = module.start_dim % total, module.end_dim % total
        return ndim - (end - start)
    if isinstance(module, nn.Unflatten):
        return ndim + len(module.unflattened_size) - 1
    return ndim


def unsupported_reason(model: nn.Module, sample_shape: tuple[int, ...]) -> str | None:
    """Why this engine cannot run ``model`` on samples of ``sample_shape`` (None when it can)."""
    if type(model) is not nn.Sequential:
        return f"the model is a {type(model).__name__}, not a plain torch.nn.Sequential"
    ndim = len(sample_shape)
    for prefix, module in leaves(model):
        name = prefix.rstrip(".")
        if type(module) not in _KNOWN:
            return f"layer {name} is a {type(module).__name__}, which the layer-stack engine does not know"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"layer {name} has forward hooks"
        if isinstance(module, nn.Flatten) and module.start_dim == 0 or isinstance(module, nn.Unflatten) and module.dim == 0:
            return f"layer {name} reshapes the batch dimension"
        if isinstance(module, nn.Linear) and ndim != 1:
            return f"layer {name} is a Linear on samples with {ndim} dimensions (the engine takes flat features)"
        ndim = _sample_ndim_after(module, ndim)
    return None


@dataclasses.dataclass
class LayerOp:
    module: nn.Module
    prefix: str
    kind: str  # "layer", "norm", "per-sample"
    moves: bool  # needs each point's own values (its weights, or a folded BatchNorm's, move)
    norm: nn.Module | None = None  # BatchNorm (eval) folded into this layer
    norm_prefix: str = ""
    batch_statistics: bool = False  # a standalone BatchNorm that normalizes with the batch's statistics
    # moving layers: the weight's basis, (K, in, out) for Linear (as bmm takes it), (K, out, ...) for Conv,
    # with a fixed BatchNorm's scale already folded in (``scale_folded``)
    weight_basis: torch.Tensor | None = None
    scale_folded: bool = False
    # layers that do not move: weight and bias with the BatchNorm folded in, computed once
    fixed: tuple | None = None




def moves(plane: Plane, prefix: str, module: nn.Module) -> bool:
    """True when one of the module's own parameters or buffers moves over the grid."""
    entries = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    return any(prefix + n in plane.moving for n in entries)


def uses_batch_statistics(norm: nn.Module, requested: bool) -> bool:
    return requested or not norm.track_running_stats or norm.running_mean is None


def compile_ops(model: nn.Sequential, plane: Plane, batch_statistics: bool) -> list[LayerOp]:
    """The network as ops: each Linear/Conv absorbs a BatchNorm that follows it in eval mode; dropout and
    identities are dropped; ReLU then max-pooling becomes pooling then ReLU (equal, as both are monotone)."""
    ops: list[LayerOp] = []
    modules = [(p, m) for p, m in leaves(model) if not isinstance(m, _SKIPPED)]
    index = 0
    while index < len(modules):
        prefix, module = modules[index]
        index += 1
        if isinstance(module, _LAYERS):
            op = LayerOp(module, prefix, "layer", moves(plane, prefix, module))
            if index < len(modules) and isinstance(modules[index][1], _NORMS):
                norm_prefix, norm = modules[index]
                if not uses_batch_statistics(norm, batch_statistics):
                    op.norm, op.norm_prefix = norm, norm_prefix
                    op.moves = op.moves or moves(plane, norm_prefix, norm)
                    index += 1
            ops.append(op)
        elif isinstance(module, _NORMS):
            ops.append(LayerOp(module, prefix, "norm", moves(plane, prefix, module),
                               batch_statistics=uses_batch_statistics(module, batch_statistics)))
        elif ops and isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and isinstance(ops[-1].module, nn.ReLU):
            ops.insert(len(ops) - 1, LayerOp(module, prefix, "per-sample", False))
        else:
            ops.append(LayerOp(module, prefix, "per-sample", False))
    return ops
