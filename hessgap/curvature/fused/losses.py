"""R-operator rules of the losses the fused engine handles: softmax cross-entropy and mean squared error.

Each rule gives the first-order gradient ∂(weight·loss)/∂outputs of a batch, and R{∂L/∂outputs} for the
k stacked R-outputs (the softmax cross-entropy Hessian is the fused kernel of
:mod:`hessgap.ops.hvp_pointwise`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import hvp_pointwise as pointwise
from .base import FusedUnsupported


class CrossEntropyRule:
    name = "cross_entropy"

    def __init__(self, ignore_index: int):
        self.ignore_index = ignore_index

    def check(self, logits, targets):
        if logits.dim() != 2:
            raise FusedUnsupported(f"cross-entropy on outputs of shape {tuple(logits.shape)} (only (batch, classes))")
        if targets.dtype not in (torch.int64, torch.int32) or targets.dim() != 1:
            raise FusedUnsupported("cross-entropy with targets that are not class indices of shape (batch,)")

    def first_order(self, logits, targets, weight):
        """p (rows of ignored targets zeroed), ∂(weight·loss)/∂logits and the R-scale."""
        p = torch.softmax(logits, dim=1)
        keep = targets != self.ignore_index
        count = int(keep.sum())
        scale = weight / max(count, 1)
        g = p.clone()
        rows = torch.nonzero(keep).squeeze(1)
        g[rows, targets[rows].long()] -= 1
        if count < targets.shape[0]:
            mask = keep.to(p.dtype).unsqueeze(1)
            p = p * mask
            g = g * mask
        return (p, scale), g * scale

    def rgrad(self, ctx, rz):
        p, scale = ctx
        return pointwise.softmax_ce_rgrad(p, rz, scale)


class MeanSquaredErrorRule:
    name = "mse"

    def check(self, outputs, targets):
        if targets.shape != outputs.shape:
            raise FusedUnsupported(
                f"MSE with targets of shape {tuple(targets.shape)} against outputs {tuple(outputs.shape)} "
                "(broadcasting is not fused)"
            )

    def first_order(self, outputs, targets, weight):
        scale = 2.0 * weight / outputs.numel()
        return scale, (outputs - targets) * scale

    def rgrad(self, scale, rz):
        return rz * scale


def loss_rule(loss_fn):
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction != "mean" or loss_fn.weight is not None or loss_fn.label_smoothing != 0:
            raise FusedUnsupported("CrossEntropyLoss with class weights, label smoothing or a reduction other than mean")
        return CrossEntropyRule(loss_fn.ignore_index)
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction != "mean":
            raise FusedUnsupported(f"MSELoss with reduction={loss_fn.reduction!r} (only 'mean' is fused)")
        return MeanSquaredErrorRule()
    if loss_fn is F.cross_entropy:
        return CrossEntropyRule(-100)
    if loss_fn is F.mse_loss:
        return MeanSquaredErrorRule()
    raise FusedUnsupported(
        f"loss {type(loss_fn).__name__} (only nn.CrossEntropyLoss, nn.MSELoss and their functional forms are fused)"
    )
