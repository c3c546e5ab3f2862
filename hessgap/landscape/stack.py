"""The layer-stack engine: a flat ``nn.Sequential`` (the paper's F and C nets) at G grid points per batch.

It does the arithmetic of G forward passes, minus the work that exact algebra makes unnecessary:

- Shared prefix. Layers whose weights do not move act on the batch once, for every point.
- First moving layer. A layer is linear in its weights, W(a, b)·x = W0·x + a·(D1·x) + b·(D2·x), so on the
  shared input it runs once per basis state (K = 2 or 3 kernels) instead of once per point. With its
  BatchNorm (eval, not moving) folded into those K outputs, every point's output is one row of a small GEMM,
  (G × K) · (K × everything): one write per output element, where a forward pass computes the layer, then
  normalizes and rectifies in further passes.
- BatchNorm in eval mode is a per-channel affine map; after a later layer it is folded into that layer's
  weights and bias, point by point, so it costs no pass over the activations.
- ReLU followed by max-pooling runs as pooling, then ReLU: the same numbers (both are monotone), a quarter of
  the elements rectified.
- Later layers run per point: a batched GEMM (``baddbmm``) over the G points for Linear, one convolution per
  point for Conv (grouped convolutions over the points were measured slower on CPU). Each point's weights are
  formed once per chunk and kept between batches while they fit.

Activations are kept as (G·B, ...) so modules that act sample by sample run once on the whole chunk. On the
CPU the batch is cut into tiles of samples so that every activation stays near ``TILE_BYTES``: larger
tensors leave the caches, and above 32 MiB the allocator maps fresh pages for each one (measured: a
quarter of the time went to page faults with whole-batch tiles on C1). BatchNorm with batch statistics
(train mode, or no running statistics) normalizes each point over its own whole batch, so it turns the
tiling off.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..curvature.batches import Batch
from .layers import LayerOp, compile_ops, moves
from .plane import Plane

#: the widest activation of one tile (points × samples) on the CPU, in bytes
TILE_BYTES = 8 * 2**20

@dataclasses.dataclass
class _Act:
    """Activations: (B, ...) shared by every point (``points`` None), or (G·B, ...) point after point."""

    tensor: torch.Tensor
    points: int | None
    owned: bool  # created here, so it may be changed in place


@dataclasses.dataclass
class Prepared:
    """What a batch needs once for every chunk of points: the activations before the first op that depends on
    the point, and, when that op is a layer, its outputs for the basis states as rows (K', B, *spatial, C),
    channels last. They combine in one GEMM (a constant row last when ``constant_row``), or, when the
    BatchNorm after the layer moves, with per-channel factors (``per_channel``)."""

    act: _Act
    start: int
    batch: int
    rows: torch.Tensor | None = None
    constant_row: bool = False
    per_channel: bool = False


def _per_channel(values: torch.Tensor, spatial: int) -> torch.Tensor:
    """(C,) or (G, C) values shaped to broadcast over (B, C, *spatial) or (G, B, C, *spatial)."""
    ones = [1] * spatial
    if values.dim() == 1:
        return values.reshape(-1, *ones)
    return values.reshape(values.shape[0], 1, values.shape[1], *ones)


def _apply_layer(layer, x, weight, bias):
    if isinstance(layer, nn.Linear):
        return torch.nn.functional.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


class StackEngine:
    name = "stack"

    def __init__(self, model: nn.Sequential, plane: Plane, batch_statistics: bool, device: torch.device):
        self.plane = plane
        self.ops = compile_ops(model, plane, batch_statistics)
        for op in self.ops:
            if op.kind == "layer":
                self._precompute(op)
        self.tiled = device.type == "cpu" and not any(op.batch_statistics for op in self.ops)
        self._numel_per_sample: int | None = None
        self._cache: dict = {}
        self._keep_weights = False

    def _value(self, name: str, own: torch.Tensor | None, coefficients: torch.Tensor | None) -> torch.Tensor | None:
        """The entry at each point, (G, *shape), when it moves; else the module's own tensor."""
        return self.plane.values(name, coefficients) if name in self.plane.moving else own

    def _norm_moves(self, op: LayerOp) -> bool:
        return op.norm is not None and moves(self.plane, op.norm_prefix, op.norm)

    def _precompute(self, op: LayerOp) -> None:
        """What a layer's weights need once: folded fixed weights, or the moving weights' folded basis."""
        if not op.moves:
            op.fixed = self._parameters(op, None)
            return
        basis = self.plane.moving.get(op.prefix + "weight")
        if basis is None:
            return
        op.scale_folded = op.norm is not None and not self._norm_moves(op)
        if op.scale_folded:
            scale, _ = self._affine(op.norm, op.norm_prefix, None)
            basis = basis * scale.reshape(1, -1, *[1] * (basis.dim() - 2))
        if isinstance(op.module, nn.Linear):
            basis = basis.transpose(1, 2)
        op.weight_basis = basis.contiguous()

    # -- BatchNorm as a per-channel affine map ---------------------------------------------------------
    def _affine(self, norm, prefix, coefficients, mean=None, var=None):
        """(scale, shift), each (C,) or (G, C), from the running statistics or the given batch statistics."""
        if mean is None:
            mean = self._value(prefix + "running_mean", norm.running_mean, coefficients)
            var = self._value(prefix + "running_var", norm.running_var, coefficients)
        scale = torch.rsqrt(var + norm.eps)
        weight = self._value(prefix + "weight", norm.weight, coefficients)
        bias = self._value(prefix + "bias", norm.bias, coefficients)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        return scale, shift if bias is None else shift + bias

    def _parameters(self, op: LayerOp, coefficients: torch.Tensor | None):
        """The layer's (weight, bias) with its BatchNorm folded in: shared, as the module holds them, or per
        point, (G, in, out) for Linear and (G, out, ...) for Conv."""
        layer = op.module
        bias = self._value(op.prefix + "bias", layer.bias, coefficients)
        if op.weight_basis is not None:
            basis = op.weight_basis
            points = coefficients.shape[0]
            weight = (coefficients @ basis.reshape(basis.shape[0], -1)).reshape(points, *basis.shape[1:])
        else:
            weight = layer.weight
        if op.norm is None:
            return weight, bias
        scale, shift = self._affine(op.norm, op.norm_prefix, coefficients)
        if not op.scale_folded:
            if isinstance(layer, nn.Linear) and weight.dim() > layer.weight.dim():  # (G, in, out)
                weight = weight * scale.unsqueeze(-2)
            else:
                weight = weight * scale.reshape(*scale.shape, *[1] * (layer.weight.dim() - 1))
                if isinstance(layer, nn.Linear) and weight.dim() > layer.weight.dim():
                    weight = weight.transpose(1, 2)
        return weight, shift if bias is None else bias * scale + shift

    # -- the pass ------------------------------------------------------------------------------------------
    def start_pass(self, keep_weights: bool) -> None:
        """A new set of points: forget the weights formed for the last; keep each chunk's weights between the
        batches of this pass when ``keep_weights``, else form them again for each batch."""
        self._cache = {}
        self._keep_weights = keep_weights

    def prepare(self, batch: Batch) -> Prepared:
        """The layers before the first moving one, run once on the (inputs, targets) batch's inputs."""
        size = batch.inputs.shape[0]
        act = _Act(batch.inputs, None, False)
        for index, op in enumerate(self.ops):
            if op.moves:
                return self._prepare_moving(op, act, index, size) if op.kind == "layer" else Prepared(act, index, size)
            act = self._run(op, act, None, size, None)
        return Prepared(act, len(self.ops), size)

    def _prepare_moving(self, op: LayerOp, act: _Act, index: int, batch: int) -> Prepared:
        """The first moving layer's outputs for each basis state, on the batch shared by every point."""
        layer, x = op.module, act.tensor
        if x.dim() == 4:  # convolutions and pooling run several times faster on channels-last images on CPU
            x = x.contiguous(memory_format=torch.channels_last)
        # rows with the channels last, so that the points' outputs are channels-last too
        weights = self.plane.moving.get(op.prefix + "weight")
        if weights is None or self._norm_moves(op):  # per-channel factors that differ by point
            bases = weights if weights is not None else [layer.weight]
            rows = torch.stack([_apply_layer(layer, x, w, None).movedim(1, -1) for w in bases])
            return Prepared(act, index, batch, rows=rows, per_channel=True)
        biases = self.plane.moving.get(op.prefix + "bias")
        rows = torch.stack([_apply_layer(layer, x, w, None if biases is None else b).movedim(1, -1)
                            for w, b in zip(weights, biases if biases is not None else [None] * len(weights))])
        constant = layer.bias if biases is None else None
        if op.norm is not None:
            scale, shift = self._affine(op.norm, op.norm_prefix, None)
            rows.mul_(scale)
            constant = shift if constant is None else constant * scale + shift
        if constant is not None and self.plane.unit_weights is not None:
            # Σ_k u_k c_k = 1 at every point, so the constant rides on the rows: one row less to read per point
            for row, weight in zip(rows, self.plane.unit_weights):
                if weight:
                    row.add_(constant, alpha=weight)
            constant = None
        if constant is not None:
            rows = torch.cat([rows, constant.expand(rows.shape[1:]).unsqueeze(0)])
        return Prepared(act, index, batch, rows=rows, constant_row=constant is not None)

    def chunk_size(self, prepared: Prepared, coefficients: torch.Tensor, budget: int) -> int:
        """Points per chunk. On the CPU a tile first takes as many samples as fit in ``TILE_BYTES`` (long
        GEMMs), then as many points; elsewhere as many points as the batch's activations allow in ``budget``."""
        size = coefficients.element_size()
        if self._numel_per_sample is None:
            record: list[int] = []
            self.outputs(prepared, coefficients[:1], record=record)
            self._numel_per_sample = max(record + [1])
            self._cache = {}
        weights = 2 * size * max((op.module.weight.numel() for op in self.ops if op.kind == "layer" and op.moves),
                                 default=0)
        per_sample = self._numel_per_sample * size
        if self.tiled:
            samples = max(1, min(prepared.batch, TILE_BYTES // per_sample))
            points = min(TILE_BYTES // (samples * per_sample), budget // max(weights, 1))
        else:
            points = budget // (3 * prepared.batch * per_sample + weights)
        return max(1, min(coefficients.shape[0], points))

    def outputs(self, prepared: Prepared, coefficients: torch.Tensor, chunk: int = 0,
                record: list | None = None) -> torch.Tensor:
        """(G, B, ...) outputs at the G points whose coefficients are given (chunk ``chunk`` of the pass);
        ``record`` collects the elements per sample after each op (one tile of one sample)."""
        if not self._keep_weights:
            self._cache = {}
        points, batch = coefficients.shape[0], prepared.batch
        if record is not None:
            tile = 1
        elif self.tiled:
            tile = max(1, min(batch, TILE_BYTES // (points * self._numel_per_sample * coefficients.element_size())))
        else:
            tile = batch
        pieces = []
        for first in range(0, batch, tile):
            samples = slice(first, min(batch, first + tile))
            size = samples.stop - samples.start
            act, start = _Act(prepared.act.tensor[samples], None, False), prepared.start
            if prepared.rows is not None:
                act = self._combine(self.ops[start], prepared, samples, coefficients)
                start += 1
                if record is not None:
                    record.append(act.tensor.numel() // size)
            for op in self.ops[start:]:
                act = self._run(op, act, coefficients, size, chunk)
                if record is not None:
                    record.append(act.tensor.numel() // (size * (act.points or 1)))
            out = act.tensor
            pieces.append(out.unsqueeze(0).expand(points, *out.shape) if act.points is None
                          else out.reshape(points, size, *out.shape[1:]))
            if record is not None:
                break
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _run(self, op: LayerOp, act: _Act, coefficients, batch: int, chunk) -> _Act:
        if op.kind == "per-sample":
            if isinstance(op.module, nn.ReLU) and act.owned:
                return _Act(act.tensor.relu_(), act.points, True)
            return _Act(op.module(act.tensor), act.points, True)
        if op.kind == "norm":
            return self._norm(op, act, coefficients, batch)
        return self._layer(op, act, coefficients, batch, chunk)

    def _combine(self, op: LayerOp, prepared: Prepared, samples: slice, coefficients: torch.Tensor) -> _Act:
        """Each point's output of the first moving layer, from the layer's outputs for the basis states."""
        points = coefficients.shape[0]
        rows = prepared.rows[:, samples]
        if not prepared.per_channel:
            if prepared.constant_row:
                ones = torch.ones(points, 1, dtype=coefficients.dtype, device=coefficients.device)
                coefficients = torch.cat([coefficients, ones], dim=1)
            out = coefficients @ rows.reshape(rows.shape[0], -1)
            return _Act(out.reshape(-1, *rows.shape[2:]).movedim(-1, 1), points, True)
        if op.prefix + "weight" in self.plane.moving:
            factors = coefficients.T.unsqueeze(-1)  # (K, G, 1)
        else:
            factors = torch.ones(1, points, 1, dtype=coefficients.dtype, device=coefficients.device)
        bias = self._value(op.prefix + "bias", op.module.bias, coefficients)
        if op.norm is not None:
            scale, shift = self._affine(op.norm, op.norm_prefix, coefficients)
            factors = factors * scale
            bias = shift if bias is None else bias * scale + shift
        ones = [1] * (rows.dim() - 3)
        out = rows[0].unsqueeze(0) * factors[0].reshape(points, 1, *ones, -1)
        for factor, row in zip(factors[1:], rows[1:]):
            out.addcmul_(row.unsqueeze(0), factor.reshape(points, 1, *ones, -1))
        if bias is not None:
            out.add_(bias.reshape(-1, 1, *ones, bias.shape[-1]) if bias.dim() == 2 else bias)
        return _Act(out.reshape(-1, *rows.shape[2:]).movedim(-1, 1), points, True)

    def _layer(self, op: LayerOp, act: _Act, coefficients, batch: int, chunk) -> _Act:
        layer = op.module
        if not op.moves:
            return _Act(_apply_layer(layer, act.tensor, *op.fixed), act.points, True)
        key = (id(op), chunk)
        if key not in self._cache:
            self._cache[key] = self._parameters(op, coefficients)
        weight, bias = self._cache[key]
        points = coefficients.shape[0]
        if weight.dim() == layer.weight.dim():  # shared weights; a per-point bias or BatchNorm shift
            out = _apply_layer(layer, act.tensor, weight, None)
            out = out.reshape(points, batch, *out.shape[1:])
            out.add_(_per_channel(bias, out.dim() - 3))
        elif isinstance(layer, nn.Linear):
            x = act.tensor.reshape(points, batch, -1)
            if bias is None:
                out = torch.bmm(x, weight)
            else:
                out = torch.baddbmm(bias.unsqueeze(1) if bias.dim() == 2 else bias, x, weight)
        else:  # one convolution per point, concatenated along the batch (keeps a channels-last layout)
            x = act.tensor.reshape(points, batch, *act.tensor.shape[1:])
            per_point_bias = bias is not None and bias.dim() == 2
            outs = [layer._conv_forward(x[g], weight[g], bias[g] if per_point_bias else bias) for g in range(points)]
            return _Act(outs[0] if points == 1 else torch.cat(outs), points, True)
        return _Act(out.reshape(-1, *out.shape[2:]), points, True)

    def _norm(self, op: LayerOp, act: _Act, coefficients, batch: int) -> _Act:
        tensor, channels = act.tensor, act.tensor.shape[1]
        mean = var = None
        if op.batch_statistics:  # over the batch and the spatial positions, for each point on its own
            groups = 1 if act.points is None else act.points
            grouped = tensor.reshape(groups, batch, channels, -1).transpose(1, 2).reshape(groups, channels, -1)
            mean, var = grouped.mean(2), grouped.var(2, unbiased=False)
            if act.points is None:
                mean, var = mean[0], var[0]
        scale, shift = self._affine(op.module, op.prefix, coefficients, mean, var)
        spatial = tensor.dim() - 2
        if act.points is None and scale.dim() == 1:
            return _Act(tensor * _per_channel(scale, spatial) + _per_channel(shift, spatial), None, True)
        points = act.points if act.points is not None else coefficients.shape[0]
        shaped = tensor.reshape(-1, batch, *tensor.shape[1:])  # (G or 1, B, C, ...)
        out = shaped * _per_channel(scale, spatial) + _per_channel(shift, spatial)
        return _Act(out.reshape(points * batch, *out.shape[2:]), points, True)
