"""Rules of the piecewise activations of mobile networks: ``hardsigmoid``, ``hardswish`` (MobileNetV3's
squeeze-excite gate and activation), ``hardtanh`` and ``relu6`` (MobileNetV2).

PyTorch has no double backward for hardsigmoid and hardswish, so autograd cannot give their Hessians; the
rules here can. Each is piecewise linear or quadratic: on every open piece the derivatives are those of a
polynomial, and the pieces' boundaries (x = ±3, the clamps) have measure zero. The first derivatives are
PyTorch's own (its backward's choice at the boundaries), the second derivative their derivative a.e.:

- hardsigmoid(x) = clamp(x/6 + 1/2, 0, 1): σ′ = 1/6 on (−3, 3), σ″ = 0;
- hardswish(x) = x·hardsigmoid(x): σ′ = x/3 + 1/2 on [−3, 3] (1 above, 0 below), σ″ = 1/3 on (−3, 3);
- hardtanh(x, a, b) = clamp(x, a, b), relu6 = hardtanh(x, 0, 6): σ′ = 1 on (a, b), σ″ = 0.
"""

from __future__ import annotations

import torch

from .base import OpRule, argument

aten = torch.ops.aten


class Piecewise(OpRule):
    def __init__(self, node):
        super().__init__(node)
        self.kind = {aten.hardsigmoid.default: "hardsigmoid", aten.hardswish.default: "hardswish",
                     aten.hardtanh.default: "hardtanh", aten.relu6.default: "hardtanh"}[node.target]
        relu6 = node.target is aten.relu6.default
        self.low = 0.0 if relu6 else float(argument(node, 1, "min_val", -1.0))
        self.high = 6.0 if relu6 else float(argument(node, 2, "max_val", 1.0))
        self.needs_grad = self.kind == "hardswish"  # the only one with a second derivative

    def derivative(self, x):
        if self.kind == "hardsigmoid":
            return ((x > -3) & (x < 3)).to(x.dtype) / 6
        if self.kind == "hardswish":
            return torch.where(x < -3, 0.0, torch.where(x <= 3, x / 3 + 0.5, 1.0)).to(x.dtype)
        return ((x > self.low) & (x < self.high)).to(x.dtype)

    def forward(self, args, kwargs):
        x = args[0]
        return self.node.target(*args, **kwargs), (x, self.derivative(x))

    def vjp(self, saved, g, need):
        return [g * saved[1]]

    def jvp(self, saved, tangents):
        rx = tangents[0]
        return rx * saved[1], rx if self.needs_grad else None

    def rvjp(self, saved, rx, g, rg, need):
        x, d1 = saved
        out = rg * d1 if rg is not None else None
        if self.needs_grad and rx is not None:
            curvature = (((x > -3) & (x < 3)).to(x.dtype) / 3) * g  # σ″·g
            out = rx * curvature if out is None else out + rx * curvature
        return [out]


RULES = {aten.hardsigmoid.default: Piecewise, aten.hardswish.default: Piecewise, aten.hardtanh.default: Piecewise,
         aten.relu6.default: Piecewise}
