"""The rule of convolutions (conv1d/2d/3d and aten.convolution, not transposed), any stride, padding,
dilation and groups.

With groups = 1 the k weight directions run as one convolution with k·O output channels, the input
gradient through them as one transposed convolution to k·C channels, and each weight-gradient term as one
``convolution_backward`` over channel-stacked operands; grouped convolutions loop over the directions.

Two shapes take a matrix-product form instead, because the convolution kernels of the CPU backend are slow
on them (measured: 2.5–4× slower than the GEMMs below at batch 32) and because most of a deep network's
weights sit there when small images go through it (ResNet-18 on 32×32 inputs: 75 % of the weights act on
1×1 maps):

- a 1×1 input giving a 1×1 output: only one tap of the kernel ever meets the input, so the convolution is a
  matrix product with that tap (the other taps' rows of the Hessian are zero);
- other outputs of at most ``SMALL_OUTPUT`` positions: the weight-gradient terms as one GEMM over the
  unfolded input (im2col), shared by the k directions.
"""

from __future__ import annotations

import torch
from torch import fx

from .base import Embedded, GraphUnsupported, OpRule

aten = torch.ops.aten

#: outputs with at most this many positions compute the weight-gradient terms by im2col and one GEMM
SMALL_OUTPUT = 4


def _tuple(value, nd):
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) == nd else [int(value[0])] * nd
    return [int(value)] * nd


def _shape_only(shape, like):
    """A tensor of ``shape`` whose values are never read (convolution_backward takes the input or the weight for
    its shape only). Uninitialized and contiguous: a stride-0 expand would be copied into a full tensor by the
    backward's ``contiguous()`` (30M elements per product on ResNet-18 at 224 × 224)."""
    return torch.empty(tuple(shape), device=like.device, dtype=like.dtype)


class Convolution(OpRule):
    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        args = list(node.args)
        target = node.target
        w_meta = args[1].meta["val"]
        nd = len(w_meta.shape) - 2
        self.nd = nd
        if target is aten.convolution.default:
            x, w, b, stride, padding, dilation, transposed, output_padding, groups = args[:9]
            if transposed:
                raise GraphUnsupported(f"{self.describe()} is a transposed convolution (not fused)")
        else:
            args += [None, 1, 0, 1, 1][len(args) - 2:]
            x, w, b, stride, padding, dilation, groups = args[:7]
        self.stride, self.dilation = _tuple(stride, nd), _tuple(dilation, nd)
        self.groups = int(groups)
        if isinstance(padding, str):
            if padding == "valid":
                padding = [0] * nd
            else:  # "same"
                padding = []
                for d in range(nd):
                    total = self.dilation[d] * (int(w_meta.shape[2 + d]) - 1)
                    if total % 2 or self.stride[d] != 1:
                        raise GraphUnsupported(f"{self.describe()} with padding='same' that is not symmetric")
                    padding.append(total // 2)
        self.padding = _tuple(padding, nd)
        self.x, self.w, self.b = x, w, b
        in_spatial = tuple(int(v) for v in x.meta["val"].shape[2:])
        out_spatial = tuple(int(v) for v in self.out_meta.shape[2:])
        self.tap = None  # the one kernel position that meets a 1×1 input (as an index tuple)
        self.small = False
        if self.groups == 1 and nd == 2:
            if all(v == 1 for v in in_spatial + out_spatial):
                tap = tuple(self.padding[d] // self.dilation[d] for d in range(nd))
                if all(self.padding[d] % self.dilation[d] == 0 and tap[d] < int(w_meta.shape[2 + d]) for d in range(nd)):
                    self.tap = tap
            else:
                positions = 1
                for v in out_spatial:
                    positions *= v
                self.small = positions <= SMALL_OUTPUT

    def inputs(self):
        return [a if isinstance(a, fx.Node) else None for a in (self.x, self.w, self.b)]

    def _conv(self, x, w, b=None, groups=None):
        return aten.convolution(x, w, b, self.stride, self.padding, self.dilation, False, [0] * self.nd,
                                self.groups if groups is None else groups)

    def _backward(self, g, x, w, mask, groups=None):
        return aten.convolution_backward(g, x, w, None, self.stride, self.padding, self.dilation, False,
                                         [0] * self.nd, self.groups if groups is None else groups, mask)

    def _input_grad(self, g, x_shape, w):
        return self._backward(g, _shape_only(x_shape, g), w, [True, False, False])[0]

    def _weight_grad(self, x, g, w_shape, groups=None):
        return self._backward(g, x, _shape_only(w_shape, x), [False, True, False], groups)[1]

    def forward(self, args, kwargs):
        y = self._conv(args[0], args[1], args[2] if len(args) > 2 else None)
        if self.tap is not None:  # the tap as a contiguous (O, C) matrix, once per batch rather than per chunk
            return y, (args[0], args[1], self._tap(args[1]).contiguous())
        return y, (args[0], args[1])

    def vjp(self, saved, g, need):
        x, w = saved[:2]
        gx, gw, _ = self._backward(g, x, w, [need[0], need[1], False])
        gb = g.sum([0] + list(range(2, g.dim()))) if need[2] else None
        return [gx if need[0] else None, gw if need[1] else None, gb]

    def _tap(self, t):
        """The kernel's tap that meets the 1×1 input: (..., O, C, kh, kw) -> (..., O, C)."""
        return t[..., self.tap[0], self.tap[1]]

    def _unfold(self, x):
        """im2col: (N, C, H, W) -> (N·positions, C·kh·kw), rows in (sample, position) order."""
        kernel = tuple(int(v) for v in self.node.args[1].meta["val"].shape[2:])
        cols = torch.nn.functional.unfold(x, kernel, self.dilation, self.padding, self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def _jvp_tap(self, x, w, w_tap, rx, rw, rb, k):
        batch, out_ch = x.shape[0], w.shape[0]
        x_m = x.reshape(batch, -1)
        ry = None
        if rw is not None:
            ry = torch.bmm(x_m.expand(k, batch, x_m.shape[1]), self._tap(rw).transpose(1, 2))
        if rx is not None:
            term = (rx.reshape(k * batch, -1) @ w_tap.t()).reshape(k, batch, out_ch)
            ry = term if ry is None else ry.add_(term)
        if rb is not None:
            ry = rb.unsqueeze(1).expand(k, batch, out_ch).clone() if ry is None else ry.add_(rb.unsqueeze(1))
        return ry.reshape(k, batch, out_ch, 1, 1), (rx, rw)

    def jvp(self, saved, tangents):
        x, w = saved[:2]
        rx, rw, rb = tangents
        k = next(t.shape[0] for t in tangents if t is not None)
        if self.tap is not None:
            return self._jvp_tap(x, w, saved[2], rx, rw, rb, k)
        batch, out_ch = x.shape[0], w.shape[0]
        ry = None
        if rx is not None:
            ry = self._conv(rx.flatten(0, 1), w)
            ry = ry.reshape((k, batch) + tuple(ry.shape[1:]))
        if rw is not None:
            if self.groups == 1:
                bias = rb.reshape(-1) if rb is not None else None
                term = self._conv(x, rw.reshape((k * out_ch,) + tuple(rw.shape[2:])), bias)
                term = term.reshape((batch, k, out_ch) + tuple(term.shape[2:])).transpose(0, 1)
            else:
                term = torch.stack([self._conv(x, rw[j], rb[j] if rb is not None else None) for j in range(k)])
            ry = term.contiguous() if ry is None else ry.add_(term)
            rb = None
        if rb is not None:
            view = rb.reshape((k, 1, out_ch) + (1,) * self.nd)
            if ry is None:
                spatial = tuple(int(s) for s in self.out_meta.shape[2:])
                ry = view.expand((k, batch, out_ch) + spatial).clone()
            else:
                ry.add_(view)
        return ry, (rx, rw)

    def _rvjp_tap(self, x, w, w_tap, rx, rw, g, rg, need, k):
        batch, out_ch, in_ch = x.shape[0], w.shape[0], w.shape[1]
        x_m, g_m = x.reshape(batch, in_ch), g.reshape(batch, out_ch)
        rg_m = rg.reshape(k, batch, out_ch) if rg is not None else None
        out = [None, None, None]
        if need[0]:
            acc = (rg_m.reshape(k * batch, out_ch) @ w_tap).reshape(k, batch, in_ch) if rg_m is not None else None
            if rw is not None:
                term = torch.bmm(g_m.expand(k, batch, out_ch), self._tap(rw))
                acc = term if acc is None else acc.add_(term)
            out[0] = None if acc is None else acc.reshape((k,) + tuple(x.shape))
        if need[1]:
            acc = torch.bmm(rg_m.transpose(1, 2), x_m.expand(k, batch, in_ch)) if rg_m is not None else None
            if rx is not None:
                term = torch.bmm(g_m.t().expand(k, out_ch, batch), rx.reshape(k, batch, in_ch))
                acc = term if acc is None else acc.add_(term)
            if acc is not None:
                out[1] = Embedded((Ellipsis, self.tap[0], self.tap[1]), acc)
        if need[2] and rg_m is not None:
            out[2] = rg_m.sum(1)
        return out

    def _weight_terms_unfolded(self, x, w, rx, g, rg, k):
        """R{∂L/∂W} = Σ x ⋆ R{g} + Σ R{x} ⋆ g by im2col and GEMMs, (k, O, C, kh, kw)."""
        out_ch = w.shape[0]
        cols = self._unfold(x)  # (B·P, C·kk)
        acc = None
        if rg is not None:
            rg_m = rg.flatten(3).transpose(2, 3).reshape(k, -1, out_ch)  # (k, B·P, O)
            acc = torch.bmm(rg_m.transpose(1, 2), cols.expand(k, *cols.shape))
        if rx is not None:
            rcols = self._unfold(rx.flatten(0, 1)).reshape(k, -1, cols.shape[1])
            g_m = g.flatten(2).transpose(1, 2).reshape(-1, out_ch)
            g_k = g_m.t().expand(k, out_ch, g_m.shape[0])
            acc = torch.bmm(g_k, rcols) if acc is None else acc.baddbmm_(g_k, rcols)
        return None if acc is None else acc.reshape((k,) + tuple(w.shape))

    def rvjp(self, saved, rsaved, g, rg, need):
        x, w = saved[:2]
        rx, rw = rsaved
        k = next(t.shape[0] for t in (rg, rx, rw) if t is not None)
        if self.tap is not None:
            return self._rvjp_tap(x, w, saved[2], rx, rw, g, rg, need, k)
        batch, out_ch, in_per_group = x.shape[0], w.shape[0], w.shape[1]
        kernel = tuple(w.shape[2:])
        out = [None, None, None]
        if need[0]:
            acc = None
            if rg is not None:
                flat = self._input_grad(rg.flatten(0, 1), (k * batch,) + tuple(x.shape[1:]), w)
                acc = flat.reshape((k,) + tuple(x.shape))
            if rw is not None:
                if self.groups == 1:
                    w_all = rw.transpose(0, 1).reshape((out_ch, k * in_per_group) + kernel)
                    term = self._input_grad(g, (batch, k * in_per_group) + tuple(x.shape[2:]), w_all)
                    term = term.reshape((batch, k) + tuple(x.shape[1:])).transpose(0, 1)
                else:
                    term = torch.stack([self._input_grad(g, tuple(x.shape), rw[j]) for j in range(k)])
                acc = term.contiguous() if acc is None else acc.add_(term)
            out[0] = acc
        if need[1] and self.small:
            out[1] = self._weight_terms_unfolded(x, w, rx, g, rg, k)
        elif need[1]:
            acc = None
            if self.groups == 1:
                if rg is not None:
                    rg_cat = rg.transpose(0, 1).reshape((batch, k * out_ch) + tuple(rg.shape[3:]))
                    acc = self._weight_grad(x, rg_cat, (k * out_ch, in_per_group) + kernel)
                    acc = acc.reshape((k, out_ch, in_per_group) + kernel)
                if rx is not None:
                    rx_cat = rx.transpose(0, 1).reshape((batch, k * in_per_group) + tuple(x.shape[2:]))
                    term = self._weight_grad(rx_cat, g, (out_ch, k * in_per_group) + kernel)
                    term = term.reshape((out_ch, k, in_per_group) + kernel).transpose(0, 1)
                    acc = term.contiguous() if acc is None else acc.add_(term)
            else:
                terms = []
                for j in range(k):
                    term = self._weight_grad(x, rg[j], tuple(w.shape)) if rg is not None else None
                    if rx is not None:
                        extra = self._weight_grad(rx[j], g, tuple(w.shape))
                        term = extra if term is None else term + extra
                    terms.append(term)
                acc = torch.stack(terms) if terms[0] is not None else None
            out[1] = acc
        if need[2] and rg is not None:
            out[2] = rg.sum([1] + list(range(3, rg.dim())))
        return out


RULES = {
    aten.conv1d.default: Convolution, aten.conv2d.default: Convolution, aten.conv3d.default: Convolution,
    aten.conv1d.padding: Convolution, aten.conv2d.padding: Convolution, aten.conv3d.padding: Convolution,
    aten.convolution.default: Convolution,
}
