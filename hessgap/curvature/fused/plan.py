"""A model and its loss compiled for the fused engine (:func:`plan`), and the engine's passes over one batch.

:meth:`FusedPlan.forward_backward` runs the primal forward and first-order backward of a batch once
(:class:`BatchState`); :meth:`FusedPlan.apply` runs R-forward and R-backward for a chunk of k directions
against that state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ... import _extension
from ..sums import ChunkSums
from .base import FusedUnsupported, LayerRule
from .layers import layer_rule
from .losses import loss_rule


def _flatten_sequential(module: nn.Module, path: str = "") -> list[tuple[str, nn.Module]]:
    if type(module) is nn.Sequential:
        out = []
        for name, child in module.named_children():
            out.extend(_flatten_sequential(child, f"{path}.{name}" if path else name))
        return out
    return [(path or type(module).__name__, module)]


@dataclass
class BatchState:
    """The primal forward/backward of one batch, shared by every chunk of directions."""

    ctxs: list
    grads_out: list  # ∂L/∂(output of layer l), scaled by the batch weight
    loss_ctx: object
    loss: torch.Tensor
    activation_numel: int = 0  # elements of the input and of every layer's output
    largest_activation_numel: int = 0


@dataclass
class FusedPlan:
    """A model + loss compiled into the layer list of the R-operator engine (see :func:`plan`)."""

    layers: list[LayerRule]
    loss: object
    num_params: int

    def forward_backward(self, inputs, targets, weight: float, batch_loss) -> BatchState:
        """Primal pass of one batch; ``weight`` scales the loss (batch size, for sums over batches)."""
        ctxs, x = [], inputs
        numel = largest = inputs.numel()
        for layer in self.layers:
            x, ctx = layer.forward(x)
            ctxs.append(ctx)
            numel += x.numel()
            largest = max(largest, x.numel())
        self.loss.check(x, targets)
        loss = batch_loss(x, targets)
        loss_ctx, g = self.loss.first_order(x, targets, weight)
        grads_out = [None] * len(self.layers)
        grads_out[-1] = g
        for i in range(len(self.layers) - 1, 0, -1):
            g = self.layers[i].backward(ctxs[i], g)
            grads_out[i - 1] = g
        return BatchState(ctxs, grads_out, loss_ctx, loss, numel, largest)

    def apply(self, state: BatchState, directions: Sequence[torch.Tensor], sums: ChunkSums) -> None:
        """(weight ×) H_batch v for the k directions (per-parameter ``(k, *shape)`` tensors), each parameter's
        product added into ``sums`` (see :class:`~hessgap.curvature.sums.ChunkSums`)."""
        v_of = [tuple(directions[s] if s is not None else None for s in layer.slots) for layer in self.layers]
        r_inputs = [None] * len(self.layers)
        rx = None
        for i, layer in enumerate(self.layers):
            r_inputs[i] = rx
            if rx is None and all(t is None for t in v_of[i]):
                continue
            rx = layer.rforward(state.ctxs[i], rx, v_of[i])
        if rx is None:  # no trainable parameter influences the output
            return
        rg = self.loss.rgrad(state.loss_ctx, rx)
        first_live = next(i for i, layer in enumerate(self.layers) if any(t is not None for t in v_of[i]))
        for i in range(len(self.layers) - 1, first_live - 1, -1):
            layer = self.layers[i]
            g_out = state.grads_out[i]
            rg, param_grads = layer.rbackward(state.ctxs[i], g_out, rg, r_inputs[i], v_of[i], i > first_live)
            for slot, pg in zip(layer.slots, param_grads):
                if slot is not None and pg is not None:
                    sums.add(slot, pg)


def plan(model: nn.Module, params: Sequence[torch.Tensor], loss_fn, train_mode: bool = False) -> FusedPlan:
    """Compile ``model`` and ``loss_fn`` for the fused engine; raises :class:`FusedUnsupported` with the reason."""
    if not _extension.available():
        raise FusedUnsupported(f"the compiled extension is not available ({_extension.load_error()})")
    if params[0].dtype not in (torch.float32, torch.float64):
        raise FusedUnsupported(f"parameters of dtype {params[0].dtype} (the fused kernels take float32 and float64)")
    if type(model) is not nn.Sequential:
        raise FusedUnsupported(f"the model is a {type(model).__name__}, not an nn.Sequential of supported layers")
    index_of = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, str] = {}
    layers = []
    for name, module in _flatten_sequential(model):
        for pname, p in module.named_parameters(recurse=True):
            if id(p) in owners:
                raise FusedUnsupported(f"parameter {name}.{pname} is shared with {owners[id(p)]} (tied weights)")
            owners[id(p)] = f"{name}.{pname}"
        layers.append(layer_rule(name, module, index_of, train_mode))
    if not layers:
        raise FusedUnsupported("the model is an empty nn.Sequential")
    return FusedPlan(layers, loss_rule(loss_fn), sum(p.numel() for p in params))
