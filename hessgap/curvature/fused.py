"""The fused R-operator engine: exact Hessian-vector products for k directions in one forward-over-reverse pass.

Pearlmutter's R-operator R{·} = d/dt (·)(θ + t v) at t = 0, applied to the forward pass and to the
backward pass of a plain layer stack, gives R{∂L/∂θ} = H v. For one batch the engine

1. runs the forward and the first-order backward once (activations x_l and output gradients g_l), then
2. for each chunk of k directions runs R-forward (R{x_l}) and R-backward (R{g_l}, R{∂L/∂θ_l}) with all k
   directions stacked along the batch dimension, so every matrix product is one large BLAS / conv call on
   (k·B, ...) tensors, and the element-wise second-order pieces (activation σ', σ''; the softmax
   cross-entropy Hessian) are the fused kernels of :mod:`hessgap.ops.hvp_pointwise`.

Supported: an ``nn.Sequential`` (nested ones too) of Linear, Conv2d (groups=1, zero padding), ReLU,
LeakyReLU, Tanh, Sigmoid, GELU, BatchNorm1d/2d with running statistics (eval mode), MaxPool2d, AvgPool2d,
Flatten, Unflatten, Dropout and Identity (eval mode), with ``nn.CrossEntropyLoss`` (mean, no class weights, no label
smoothing, class-index targets) or ``nn.MSELoss`` (mean). :func:`plan` raises :class:`FusedUnsupported`
naming the first thing it cannot handle; callers then take the generic torch.func path.

Shapes: a primal tensor has shape (B, ...); its R-counterpart has shape (k, B, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _extension
from ..ops import hvp_pointwise as pointwise


class FusedUnsupported(Exception):
    """The model, loss or data is outside what the fused engine handles; the message says what."""


# ---- layers ---------------------------------------------------------------------------------------------
#
# Each layer implements
#   forward(x) -> (y, ctx)                              primal, saving what the other passes need
#   backward(ctx, g_y) -> g_x                           first-order gradient w.r.t. the input
#   rforward(ctx, rx, v) -> ry                          rx is None when the input does not depend on θ
#   rbackward(ctx, g_y, rg_y, rx, v, need_rg_x) -> (rg_x, [R{∂L/∂p} per own trainable parameter])
# where v holds the layer's own parameter directions (None for a frozen parameter).


def _param_slot(p: torch.Tensor | None, index_of: dict[int, int]) -> int | None:
    """Index of ``p`` among the trainable parameters, or None when absent or frozen."""
    if p is None or not p.requires_grad:
        return None
    return index_of[id(p)]


class _Layer:
    slots: tuple[int | None, ...] = ()  # positions of the layer's (weight, bias) among the trainable parameters


class _Linear(_Layer):
    def __init__(self, module: nn.Linear, index_of):
        self.weight, self.bias = module.weight, module.bias
        self.slots = (_param_slot(module.weight, index_of), _param_slot(module.bias, index_of))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias), x

    def backward(self, x, g_y):
        return g_y @ self.weight

    # Every product below is one BLAS call over all k directions; the batch-side operand that is shared by
    # the directions enters as a stride-0 expand (no copy), and sums accumulate in place (baddbmm_/addmm_)
    # instead of through separate element-wise passes.

    def rforward(self, x, rx, v):
        vw, vb = v
        k = _k_of(v, rx)
        w = self.weight
        out_features, in_features = w.shape
        x_rows = x.reshape(-1, in_features)
        rows = x_rows.shape[0]
        if vw is not None:
            start = vb.reshape(k, 1, out_features) if vb is not None else None
            wt = vw.transpose(1, 2)
            x_k = x_rows.expand(k, rows, in_features)
            ry = torch.bmm(x_k, wt) if start is None else torch.baddbmm(start, x_k, wt)
        elif vb is not None:
            ry = vb.reshape(k, 1, out_features).expand(k, rows, out_features).clone()
        else:
            ry = None
        if rx is not None:
            rx_rows = rx.reshape(k * rows, in_features)
            if ry is None:
                ry = (rx_rows @ w.t()).reshape(k, rows, out_features)
            else:
                ry.view(k * rows, out_features).addmm_(rx_rows, w.t())
        return ry.reshape((k,) + x.shape[:-1] + (out_features,))

    def rbackward(self, x, g_y, rg_y, rx, v, need_rg_x):
        vw, _ = v
        k = rg_y.shape[0]
        w = self.weight
        out_features, in_features = w.shape
        g_rows = g_y.reshape(-1, out_features)
        rows = g_rows.shape[0]
        rg_rows = rg_y.reshape(k, rows, out_features)
        rg_x = None
        if need_rg_x:
            # R{g_x} = R{g_y} W + g_y V_W
            rg_x = (rg_rows.reshape(k * rows, out_features) @ w).reshape(k, rows, in_features)
            if vw is not None:
                rg_x.baddbmm_(g_rows.expand(k, rows, out_features), vw)
            rg_x = rg_x.reshape((k,) + x.shape)
        grads = []
        if self.slots[0] is not None:
            # R{∂L/∂W} = R{g_y}ᵀ x + g_yᵀ R{x}
            x_rows = x.reshape(rows, in_features)
            rgw = torch.bmm(rg_rows.transpose(1, 2), x_rows.expand(k, rows, in_features))
            if rx is not None:
                rgw.baddbmm_(g_rows.t().expand(k, out_features, rows), rx.reshape(k, rows, in_features))
            grads.append(rgw)
        else:
            grads.append(None)
        grads.append(rg_rows.sum(1) if self.slots[1] is not None else None)
        return rg_x, grads


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class _Conv2d(_Layer):
    def __init__(self, module: nn.Conv2d, index_of):
        if module.groups != 1:
            raise FusedUnsupported(f"Conv2d with groups={module.groups} (only groups=1 is fused)")
        if module.padding_mode != "zeros":
            raise FusedUnsupported(f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros' is fused)")
        if isinstance(module.padding, str):
            raise FusedUnsupported(f"Conv2d with padding={module.padding!r} (give the padding as numbers)")
        self.weight, self.bias = module.weight, module.bias
        self.stride, self.padding, self.dilation = _pair(module.stride), _pair(module.padding), _pair(module.dilation)
        self.slots = (_param_slot(module.weight, index_of), _param_slot(module.bias, index_of))

    def _conv(self, x, w):
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

    def _input_grad(self, g, w, input_hw):
        """∂/∂x of ⟨g, conv(x, w)⟩ for an input of spatial size ``input_hw``."""
        return F.conv_transpose2d(g, w, None, self.stride, self.padding, self._output_padding(g, w, input_hw), 1,
                                  self.dilation)

    def _output_padding(self, g, w, input_hw):
        pads = []
        for i in range(2):
            size = (g.shape[2 + i] - 1) * self.stride[i] - 2 * self.padding[i] + self.dilation[i] * (w.shape[2 + i] - 1) + 1
            pads.append(input_hw[i] - size)
        return tuple(pads)

    def _weight_grad(self, x, g, weight_shape):
        """Σ_b g[b] ⋆ x[b]: the weight gradient of conv(x, w) for output gradient g."""
        return torch.ops.aten.convolution_backward(
            g, x, _shape_of(weight_shape, x), None, list(self.stride), list(self.padding), list(self.dilation), False, [0, 0], 1, [False, True, False],
        )[1]

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation), x

    def backward(self, x, g_y):
        return self._input_grad(g_y, self.weight, x.shape[2:])

    def rforward(self, x, rx, v):
        vw, vb = v
        k = _k_of(v, rx)
        batch = x.shape[0]
        out_channels = self.weight.shape[0]
        ry = None
        if rx is not None:
            ry = self._conv(rx.reshape((-1,) + rx.shape[2:]), self.weight)
            ry = ry.reshape((k, batch) + ry.shape[1:])
        if vw is not None:
            # all k weight directions as one conv with k·O output channels (bias directions folded in)
            bias = vb.reshape(-1) if vb is not None else None
            term = F.conv2d(x, vw.reshape((k * out_channels,) + vw.shape[2:]), bias, self.stride, self.padding,
                            self.dilation)
            term = term.reshape((batch, k, out_channels) + term.shape[2:]).transpose(0, 1)
            ry = term.contiguous() if ry is None else ry.add_(term)
            vb = None
        if vb is not None:
            vb_view = vb.reshape(k, 1, out_channels, 1, 1)
            if ry is None:  # frozen weight, trainable bias
                out_hw = self._conv(x[:1], self.weight).shape[2:]
                ry = vb_view.expand((k, batch, out_channels) + out_hw).clone()
            else:
                ry.add_(vb_view)
        return ry

    def rbackward(self, x, g_y, rg_y, rx, v, need_rg_x):
        vw, _ = v
        k, batch = rg_y.shape[0], rg_y.shape[1]
        out_channels, in_channels = self.weight.shape[:2]
        kernel = tuple(self.weight.shape[2:])
        rg_x = None
        if need_rg_x:
            rg_x = self._input_grad(rg_y.reshape((k * batch,) + rg_y.shape[2:]), self.weight, x.shape[2:])
            rg_x = rg_x.reshape((k,) + x.shape)
            if vw is not None:
                # input gradient through all k weight directions: a transposed conv to k·C channels
                w_all = vw.transpose(0, 1).reshape((out_channels, k * in_channels) + kernel)
                term = self._input_grad(g_y, w_all, x.shape[2:])
                rg_x.add_(term.reshape((batch, k) + x.shape[1:]).transpose(0, 1))
        grads = []
        if self.slots[0] is not None:
            # R{∂L/∂W}: weight gradient of conv(x, ·) for R{g_y}, plus that of conv(R{x}, ·) for g_y
            rg_cat = rg_y.transpose(0, 1).reshape((batch, k * out_channels) + rg_y.shape[3:])
            rgw = self._weight_grad(x, rg_cat, (k * out_channels, in_channels) + kernel)
            rgw = rgw.reshape((k, out_channels, in_channels) + kernel)
            if rx is not None:
                rx_cat = rx.transpose(0, 1).reshape((batch, k * in_channels) + x.shape[2:])
                term = self._weight_grad(rx_cat, g_y, (out_channels, k * in_channels) + kernel)
                rgw.add_(term.reshape((out_channels, k, in_channels) + kernel).transpose(0, 1))
            grads.append(rgw)
        else:
            grads.append(None)
        grads.append(rg_y.sum((1, 3, 4)) if self.slots[1] is not None else None)
        return rg_x, grads


def _shape_of(shape, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` whose values are never read (convolution_backward needs the weight's shape)."""
    return torch.empty((1,) * len(shape), device=like.device, dtype=like.dtype).expand(shape)


class _BatchNorm(_Layer):
    """BatchNorm with running statistics: per-channel y = x̂·w + b, x̂ = (x − μ)/σ, linear in x and in (w, b)."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, index_of, train: bool):
        if train or module.running_mean is None:
            raise FusedUnsupported(
                f"{type(module).__name__} normalising with batch statistics (train mode or "
                "track_running_stats=False); only running statistics (eval mode) are fused"
            )
        self.module = module
        self.weight, self.bias = module.weight, module.bias
        self.slots = (_param_slot(module.weight, index_of), _param_slot(module.bias, index_of))

    def _view(self, t, x_dim):
        return t.reshape((1, -1) + (1,) * (x_dim - 2))

    def forward(self, x):
        m = self.module
        inv_std = torch.rsqrt(m.running_var.to(x.dtype) + m.eps)
        xhat = (x - self._view(m.running_mean.to(x.dtype), x.dim())) * self._view(inv_std, x.dim())
        scale = inv_std * self.weight if self.weight is not None else inv_std
        y = xhat * self._view(self.weight, x.dim()) if self.weight is not None else xhat
        if self.bias is not None:
            y = y + self._view(self.bias, x.dim())
        return y, [xhat, inv_std, scale, None]

    def backward(self, ctx, g_y):
        xhat, inv_std, scale, _ = ctx
        # g_y / σ, shared by every chunk's R-backward (the input gradient through the weight directions)
        ctx[3] = g_y * self._view(inv_std, g_y.dim())
        return g_y * self._view(scale, g_y.dim())

    def _per_channel(self, t, k, dim):
        """(k, C) -> broadcastable against (k, B, C, ...)."""
        return t.reshape((k, 1, -1) + (1,) * (dim - 3))

    def rforward(self, ctx, rx, v):
        xhat, _, scale, _ = ctx
        vw, vb = v
        k = _k_of(v, rx)
        dim = xhat.dim() + 1
        # addcmul keeps it to one pass per term (these tensors are k times the activations)
        if rx is not None:
            base = self._per_channel(vb, k, dim) if vb is not None else None
            ry = torch.mul(rx, self._view(scale, xhat.dim())) if base is None else torch.addcmul(
                base, rx, self._view(scale, xhat.dim()))
            if vw is not None:
                ry.addcmul_(xhat.unsqueeze(0), self._per_channel(vw, k, dim))
            return ry
        ry = xhat.new_zeros((k,) + xhat.shape)
        if vb is not None:
            ry.add_(self._per_channel(vb, k, dim))
        if vw is not None:
            ry.addcmul_(xhat.unsqueeze(0), self._per_channel(vw, k, dim))
        return ry

    def rbackward(self, ctx, g_y, rg_y, rx, v, need_rg_x):
        xhat, inv_std, scale, g_over_std = ctx
        vw, _ = v
        k = rg_y.shape[0]
        dim = rg_y.dim()
        rg_x = None
        if need_rg_x:
            rg_x = torch.mul(rg_y, self._view(scale, xhat.dim()))
            if vw is not None:
                rg_x.addcmul_(g_over_std.unsqueeze(0), self._per_channel(vw, k, dim))
        reduce_dims = (1,) + tuple(range(3, dim))
        grads = []
        if self.slots[0] is not None:
            # R{∂L/∂w} = Σ R{g_y}·x̂ + g_y·R{x}/σ over batch and space, summed in one reduction
            prod = rg_y * xhat.unsqueeze(0)
            if rx is not None:
                prod.addcmul_(rx, g_over_std.unsqueeze(0))
            grads.append(prod.sum(reduce_dims))
        else:
            grads.append(None)
        grads.append(rg_y.sum(reduce_dims) if self.slots[1] is not None else None)
        return rg_x, grads


class _Activation(_Layer):
    def __init__(self, kind: str, slope: float = 0.01):
        self.kind, self.slope = kind, slope

    def forward(self, z):
        return pointwise.activation_reference(z, self.kind, self.slope), z

    def backward(self, z, g_a):
        return pointwise.act_jvp(z, g_a.unsqueeze(0), self.kind, self.slope)[0]

    def rforward(self, z, rz, v):
        return None if rz is None else pointwise.act_jvp(z, rz, self.kind, self.slope)

    def rbackward(self, z, g_a, rg_a, rz, v, need_rg_x):
        if not need_rg_x:
            return None, []
        if rz is None:
            return pointwise.act_jvp(z, rg_a, self.kind, self.slope), []
        return pointwise.act_rbackward(z, g_a, rz, rg_a, self.kind, self.slope), []


class _MaxPool2d(_Layer):
    def __init__(self, module: nn.MaxPool2d):
        if module.return_indices:
            raise FusedUnsupported("MaxPool2d with return_indices=True")
        self.args = (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)

    def forward(self, x):
        y, idx = F.max_pool2d(x, *self.args[:4], ceil_mode=self.args[4], return_indices=True)
        return y, (x.shape, idx)

    @staticmethod
    def _gather(t, idx, k):
        # t (k, B, C, H, W) -> values at the argmax positions, (k, B, C, H', W')
        flat_idx = idx.reshape(1, idx.shape[0], idx.shape[1], -1).expand(k, -1, -1, -1)
        out = t.reshape(t.shape[:3] + (-1,)).gather(3, flat_idx)
        return out.reshape((k,) + idx.shape)

    @staticmethod
    def _scatter(g, idx, x_shape, k):
        flat_idx = idx.reshape(1, idx.shape[0], idx.shape[1], -1).expand(k, -1, -1, -1)
        out = g.new_zeros((k,) + tuple(x_shape[:2]) + (x_shape[2] * x_shape[3],))
        out.scatter_add_(3, flat_idx, g.reshape(g.shape[:3] + (-1,)))
        return out.reshape((k,) + tuple(x_shape))

    def backward(self, ctx, g_y):
        x_shape, idx = ctx
        return self._scatter(g_y.unsqueeze(0), idx, x_shape, 1)[0]

    def rforward(self, ctx, rx, v):
        return None if rx is None else self._gather(rx, ctx[1], rx.shape[0])

    def rbackward(self, ctx, g_y, rg_y, rx, v, need_rg_x):
        if not need_rg_x:
            return None, []
        x_shape, idx = ctx
        return self._scatter(rg_y, idx, x_shape, rg_y.shape[0]), []


class _AvgPool2d(_Layer):
    def __init__(self, module: nn.AvgPool2d):
        kernel = _pair(module.kernel_size)
        stride = _pair(module.stride) if module.stride is not None else kernel
        self.kernel, self.stride, self.padding = kernel, stride, _pair(module.padding)
        self.ceil_mode, self.count_include_pad = module.ceil_mode, module.count_include_pad
        self.divisor_override = module.divisor_override

    def _pool(self, x):
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)

    def _unpool(self, g, x_like):
        return torch.ops.aten.avg_pool2d_backward(g, x_like, list(self.kernel), list(self.stride), list(self.padding),
                                                  self.ceil_mode, self.count_include_pad, self.divisor_override)

    def forward(self, x):
        return self._pool(x), x.shape

    def backward(self, x_shape, g_y):
        return self._unpool(g_y, _shape_of(x_shape, g_y))

    def rforward(self, x_shape, rx, v):
        if rx is None:
            return None
        y = self._pool(rx.reshape((-1,) + rx.shape[2:]))
        return y.reshape(rx.shape[:2] + y.shape[1:])

    def rbackward(self, x_shape, g_y, rg_y, rx, v, need_rg_x):
        if not need_rg_x:
            return None, []
        k = rg_y.shape[0]
        flat_shape = (k * x_shape[0],) + tuple(x_shape[1:])
        rg_x = self._unpool(rg_y.reshape((-1,) + rg_y.shape[2:]), _shape_of(flat_shape, rg_y))
        return rg_x.reshape((k,) + tuple(x_shape)), []


class _Reshape(_Layer):
    """Flatten or Unflatten (modules that only reshape): R-quantities reshape the same way."""

    def __init__(self, module: nn.Module):
        self.module = module

    def forward(self, x):
        return self.module(x), x.shape

    def backward(self, x_shape, g_y):
        return g_y.reshape(x_shape)

    def rforward(self, x_shape, rx, v):
        if rx is None:
            return None
        y_shape = self.module(torch.empty(x_shape, device="meta")).shape
        return rx.reshape((rx.shape[0],) + tuple(y_shape))

    def rbackward(self, x_shape, g_y, rg_y, rx, v, need_rg_x):
        return (rg_y.reshape((rg_y.shape[0],) + tuple(x_shape)) if need_rg_x else None), []


class _Identity(_Layer):
    def forward(self, x):
        return x, None

    def backward(self, ctx, g_y):
        return g_y

    def rforward(self, ctx, rx, v):
        return rx

    def rbackward(self, ctx, g_y, rg_y, rx, v, need_rg_x):
        return (rg_y if need_rg_x else None), []


def _k_of(v, rx) -> int:
    if rx is not None:
        return rx.shape[0]
    for t in v:
        if t is not None:
            return t.shape[0]
    raise AssertionError("a layer with neither R-input nor parameter directions has no R-output")


# ---- losses ---------------------------------------------------------------------------------------------


class _CrossEntropy:
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


class _MeanSquaredError:
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


def _loss_of(loss_fn):
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction != "mean" or loss_fn.weight is not None or loss_fn.label_smoothing != 0:
            raise FusedUnsupported("CrossEntropyLoss with class weights, label smoothing or a reduction other than mean")
        return _CrossEntropy(loss_fn.ignore_index)
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction != "mean":
            raise FusedUnsupported(f"MSELoss with reduction={loss_fn.reduction!r} (only 'mean' is fused)")
        return _MeanSquaredError()
    if loss_fn is F.cross_entropy:
        return _CrossEntropy(-100)
    if loss_fn is F.mse_loss:
        return _MeanSquaredError()
    raise FusedUnsupported(
        f"loss {type(loss_fn).__name__} (only nn.CrossEntropyLoss, nn.MSELoss and their functional forms are fused)"
    )


# ---- the plan -------------------------------------------------------------------------------------------

_ACTIVATIONS: dict[type, Callable[[nn.Module], _Activation]] = {
    nn.ReLU: lambda m: _Activation("relu"),
    nn.LeakyReLU: lambda m: _Activation("leaky_relu", m.negative_slope),
    nn.Tanh: lambda m: _Activation("tanh"),
    nn.Sigmoid: lambda m: _Activation("sigmoid"),
    nn.GELU: lambda m: _Activation("gelu" if m.approximate == "none" else "gelu_tanh"),
}


def _flatten_sequential(module: nn.Module, path: str = "") -> list[tuple[str, nn.Module]]:
    if type(module) is nn.Sequential:
        out = []
        for name, child in module.named_children():
            out.extend(_flatten_sequential(child, f"{path}.{name}" if path else name))
        return out
    return [(path or type(module).__name__, module)]


def _layer_of(name: str, module: nn.Module, index_of, train: bool) -> _Layer:
    kind = type(module)
    if module._forward_hooks or module._forward_pre_hooks:
        raise FusedUnsupported(f"layer {name} ({kind.__name__}) has forward hooks")
    if kind is nn.Linear:
        return _Linear(module, index_of)
    if kind is nn.Conv2d:
        return _Conv2d(module, index_of)
    if kind in _ACTIVATIONS:
        return _ACTIVATIONS[kind](module)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        return _BatchNorm(module, index_of, train)
    if kind is nn.MaxPool2d:
        return _MaxPool2d(module)
    if kind is nn.AvgPool2d:
        return _AvgPool2d(module)
    if kind in (nn.Flatten, nn.Unflatten):
        return _Reshape(module)
    if kind in (nn.Dropout, nn.Identity):
        if train and kind is nn.Dropout and module.p > 0:
            raise FusedUnsupported(f"layer {name} is Dropout in train mode (random masks are not fused)")
        return _Identity()
    raise FusedUnsupported(f"layer {name} is a {kind.__name__}, which the fused engine does not handle")


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

    layers: list[_Layer]
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

    def apply(self, state: BatchState, directions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(weight ×) H_batch v for the k directions (per-parameter ``(k, *shape)`` tensors)."""
        k = directions[0].shape[0]
        v_of = [tuple(directions[s] if s is not None else None for s in layer.slots) for layer in self.layers]
        r_inputs = [None] * len(self.layers)
        rx = None
        for i, layer in enumerate(self.layers):
            r_inputs[i] = rx
            if rx is None and all(t is None for t in v_of[i]):
                continue
            rx = layer.rforward(state.ctxs[i], rx, v_of[i])
        if rx is None:  # no trainable parameter influences the output
            return [torch.zeros_like(d) for d in directions]
        rg = self.loss.rgrad(state.loss_ctx, rx)
        out: list[torch.Tensor | None] = [None] * len(directions)
        first_live = next(i for i, layer in enumerate(self.layers) if any(t is not None for t in v_of[i]))
        for i in range(len(self.layers) - 1, first_live - 1, -1):
            layer = self.layers[i]
            g_out = state.grads_out[i]
            rg, param_grads = layer.rbackward(state.ctxs[i], g_out, rg, r_inputs[i], v_of[i], i > first_live)
            for slot, pg in zip(layer.slots, param_grads):
                if slot is not None and pg is not None:
                    out[slot] = pg if out[slot] is None else out[slot] + pg
        return [o if o is not None else torch.zeros_like(d) for o, d in zip(out, directions)]


def plan(model: nn.Module, params: Sequence[torch.Tensor], loss_fn, train: bool = False) -> FusedPlan:
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
        layers.append(_layer_of(name, module, index_of, train))
    if not layers:
        raise FusedUnsupported("the model is an empty nn.Sequential")
    return FusedPlan(layers, _loss_of(loss_fn), sum(p.numel() for p in params))
