"""R-operator rules of the dense layers, Linear and Conv2d: every product is one BLAS or convolution call
over all k directions stacked along the batch dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FusedUnsupported, LayerRule, k_of, pair, param_slot, shape_of


class LinearRule(LayerRule):
    def __init__(self, module: nn.Linear, index_of):
        self.weight, self.bias = module.weight, module.bias
        self.slots = (param_slot(module.weight, index_of), param_slot(module.bias, index_of))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias), x

    def backward(self, x, g_y):
        return g_y @ self.weight

    # Every product below is one BLAS call over all k directions; the batch-side operand that is shared by
    # the directions enters as a stride-0 expand (no copy), and sums accumulate in place (baddbmm_/addmm_)
    # instead of through separate element-wise passes.

    def rforward(self, x, rx, v):
        vw, vb = v
        k = k_of(v, rx)
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

class Conv2dRule(LayerRule):
    def __init__(self, module: nn.Conv2d, index_of):
        if module.groups != 1:
            raise FusedUnsupported(f"Conv2d with groups={module.groups} (only groups=1 is fused)")
        if module.padding_mode != "zeros":
            raise FusedUnsupported(f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros' is fused)")
        if isinstance(module.padding, str):
            raise FusedUnsupported(f"Conv2d with padding={module.padding!r} (give the padding as numbers)")
        self.weight, self.bias = module.weight, module.bias
        self.stride, self.padding, self.dilation = pair(module.stride), pair(module.padding), pair(module.dilation)
        self.slots = (param_slot(module.weight, index_of), param_slot(module.bias, index_of))

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
            g, x, shape_of(weight_shape, x), None, list(self.stride), list(self.padding), list(self.dilation), False, [0, 0], 1, [False, True, False],
        )[1]

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation), x

    def backward(self, x, g_y):
        return self._input_grad(g_y, self.weight, x.shape[2:])

    def rforward(self, x, rx, v):
        vw, vb = v
        k = k_of(v, rx)
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
