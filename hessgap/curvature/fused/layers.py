"""The rule for each supported layer (:func:`layer_rule`), and the rules of the layers that are not dense:
BatchNorm with running statistics, element-wise activations, pooling, reshapes and identities.

The dense layers' rules (Linear, Conv2d) live in :mod:`hessgap.curvature.fused.dense`; the interface
every rule implements is :class:`hessgap.curvature.fused.base.LayerRule`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import hvp_pointwise as pointwise
from .base import FusedUnsupported, LayerRule, k_of, pair, param_slot, shape_of
from .dense import Conv2dRule, LinearRule


class BatchNormRule(LayerRule):
    """BatchNorm with running statistics: per-channel y = x̂·w + b, x̂ = (x − μ)/σ, linear in x and in (w, b)."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, index_of, train_mode: bool):
        if train_mode or module.running_mean is None:
            raise FusedUnsupported(
                f"{type(module).__name__} normalising with batch statistics (train mode or "
                "track_running_stats=False); only running statistics (eval mode) are fused"
            )
        self.module = module
        self.weight, self.bias = module.weight, module.bias
        self.slots = (param_slot(module.weight, index_of), param_slot(module.bias, index_of))

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
        k = k_of(v, rx)
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


class ActivationRule(LayerRule):
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


class MaxPool2dRule(LayerRule):
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


class AvgPool2dRule(LayerRule):
    def __init__(self, module: nn.AvgPool2d):
        kernel = pair(module.kernel_size)
        stride = pair(module.stride) if module.stride is not None else kernel
        self.kernel, self.stride, self.padding = kernel, stride, pair(module.padding)
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
        return self._unpool(g_y, shape_of(x_shape, g_y))

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
        rg_x = self._unpool(rg_y.reshape((-1,) + rg_y.shape[2:]), shape_of(flat_shape, rg_y))
        return rg_x.reshape((k,) + tuple(x_shape)), []


class ReshapeRule(LayerRule):
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


class IdentityRule(LayerRule):
    def forward(self, x):
        return x, None

    def backward(self, ctx, g_y):
        return g_y

    def rforward(self, ctx, rx, v):
        return rx

    def rbackward(self, ctx, g_y, rg_y, rx, v, need_rg_x):
        return (rg_y if need_rg_x else None), []


ACTIVATIONS: dict[type, Callable[[nn.Module], ActivationRule]] = {
    nn.ReLU: lambda m: ActivationRule("relu"),
    nn.LeakyReLU: lambda m: ActivationRule("leaky_relu", m.negative_slope),
    nn.Tanh: lambda m: ActivationRule("tanh"),
    nn.Sigmoid: lambda m: ActivationRule("sigmoid"),
    nn.GELU: lambda m: ActivationRule("gelu" if m.approximate == "none" else "gelu_tanh"),
}


def layer_rule(name: str, module: nn.Module, index_of, train_mode: bool) -> LayerRule:
    """The rule of ``module`` (``name`` in messages); raises :class:`FusedUnsupported` for any other layer."""
    kind = type(module)
    if module._forward_hooks or module._forward_pre_hooks:
        raise FusedUnsupported(f"layer {name} ({kind.__name__}) has forward hooks")
    if kind is nn.Linear:
        return LinearRule(module, index_of)
    if kind is nn.Conv2d:
        return Conv2dRule(module, index_of)
    if kind in ACTIVATIONS:
        return ACTIVATIONS[kind](module)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        return BatchNormRule(module, index_of, train_mode)
    if kind is nn.MaxPool2d:
        return MaxPool2dRule(module)
    if kind is nn.AvgPool2d:
        return AvgPool2dRule(module)
    if kind in (nn.Flatten, nn.Unflatten):
        return ReshapeRule(module)
    if kind in (nn.Dropout, nn.Identity):
        if train_mode and kind is nn.Dropout and module.p > 0:
            raise FusedUnsupported(f"layer {name} is Dropout in train mode (random masks are not fused)")
        return IdentityRule()
    raise FusedUnsupported(f"layer {name} is a {kind.__name__}, which the fused engine does not handle")
