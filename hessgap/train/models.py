"""The networks of Keskar et al. (2017), Table 1 / Appendix B, built from standard layers only.

Every model is a flat ``nn.Sequential`` of Flatten, Linear, Conv2d, BatchNorm1d/2d, ReLU, MaxPool2d and
Dropout (plus one Unflatten for 1-D signals), with no custom forward, so hessgap's fused HVP engine can
walk it layer by layer.

Two variants follow the authors' Keras code (``network_zoo.py`` of keskarnitish/large-batch-training)
where it differs from these defaults: ``init="glorot"`` (Keras's Glorot-uniform weights and zero biases,
instead of PyTorch's default initialization) and ``conv_dropout=True`` for C2/C4 (the authors' VGG puts
dropout 0.3 after the first convolution, 0.4 after every other convolution of a stack but its last, and
``dropout`` after the flattening as well as after the dense layer).

Scaling: ``width`` multiplies every channel and unit count (at least 1 each); ``depth`` multiplies the
number of repeated blocks (F nets: hidden layers; C1/C3: conv blocks; C2/C4: convolutions per stack;
at least 1 each). ``width=depth=1`` gives the paper's networks.

Adapting to the data:

- Images (C×H×W): the F nets flatten them; the C nets use the paper's square kernels with "same"
  padding. A pooling layer that would shrink a side below 1 pixel leaves that side alone, and is left
  out entirely when both sides are already 1 (so VGG's five pools fit 8×8 digits).
- Flat feature vectors (L,), e.g. MNIST-1D: the F nets use them as they are; the C nets view the
  signal as a 1×1×L image (one ``nn.Unflatten``) and use 1×k kernels and 1×k pools along it. A 1-D
  signal is ordered along L, so 1-D convolutions are meaningful there (MNIST-1D was designed for
  them); unordered tabular features would not be, and are not among hessgap's data sets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import torch
from torch import nn

from .. import _checks
from ..errors import HessgapError
from ..names import INIT_NAMES, MODEL_NAMES, model_name

__all__ = ["MODEL_NAMES", "build_model", "check_fits_memory", "count_parameters", "glorot_", "parameter_count"]

# hidden layers of the fully connected nets (Linear 512 + BN + ReLU each)
_DENSE_LAYERS = {"F1": 5, "F2": 7}
# AlexNet-like: conv blocks of 64 channels, 5×5, then dense 384 and 192
_ALEX_BLOCKS, _ALEX_CHANNELS, _ALEX_KERNEL, _ALEX_DENSE = 2, 64, 5, (384, 192)
# VGG-like: (channels, convolutions) per stack, 3×3 kernels, 2×2 pool after each stack, dense 512
_VGG_STACKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
_VGG_DENSE = 512
# the authors' VGG dropout (conv_dropout=True): after the net's first convolution, and after the others but
# the last of each stack
_VGG_FIRST_DROPOUT, _VGG_CONV_DROPOUT = 0.3, 0.4
#: the most repeated blocks ``depth`` may give a network (the paper's deepest, C2/C4, has 13): every block is
#: a few Python modules, built and run one call each, so beyond this building alone takes hours
MAX_BLOCKS = 10_000


def _check_scale(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise HessgapError(f"{name} must be a positive number, got {value!r}") from None
    if not value > 0 or value == float("inf"):
        raise HessgapError(f"{name} must be a positive finite number (1.0 = the paper's network), got {value}")
    return value


def _scaled(count: int, factor: float) -> int:
    scaled = count * factor
    if scaled == float("inf"):
        raise HessgapError(f"a width or depth of {factor:g} scales {count} layers or units beyond the float range; "
                           "use a scale near 1.0 (the paper's network)")
    return max(1, int(round(scaled)))


def _count(number: int) -> str:
    """An integer for a message: exact with thousands separators, or rounded when too long to read (Decimal: a
    width of 1e300 gives counts of 600 digits, beyond a float)."""
    return f"{number:,}" if number < 10**15 else f"{Decimal(number):.3g}"


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise HessgapError(f"input_shape must be a tuple of ints (C, H, W) or (L,), got {input_shape!r}") from None
    if len(shape) not in (1, 3) or any(s <= 0 for s in shape):
        raise HessgapError(
            f"input_shape must be (C, H, W) for images or (L,) for a flat feature vector, with positive sizes; "
            f"got {shape}"
        )
    return shape


@dataclass(frozen=True)
class _Layer:
    """One layer of a network's plan: the module to build and its parameter count, known before anything is
    allocated (so a network too large for memory is refused before it is built)."""

    module: type[nn.Module]
    args: tuple = ()
    options: tuple = ()  # keyword arguments, as (name, value) pairs
    parameters: int = 0

    def build(self) -> nn.Module:
        return self.module(*self.args, **dict(self.options))


def _linear(in_features: int, out_features: int) -> _Layer:
    return _Layer(nn.Linear, (in_features, out_features), parameters=in_features * out_features + out_features)


def _dense_block(in_features: int, out_features: int, dropout: float | None) -> list[_Layer]:
    layers = [_linear(in_features, out_features), _Layer(nn.BatchNorm1d, (out_features,), parameters=2 * out_features),
              _Layer(nn.ReLU)]
    if dropout:
        layers.append(_Layer(nn.Dropout, (dropout,)))
    return layers


class _ConvShape:
    """Tracks the spatial size through conv/pool layers and plans kernels that fit it."""

    def __init__(self, input_shape: tuple[int, ...]):
        if len(input_shape) == 1:
            self.flat = True
            self.channels, self.height, self.width = 1, 1, input_shape[0]
        else:
            self.flat = False
            self.channels, self.height, self.width = input_shape

    def prefix(self) -> list[_Layer]:
        return [_Layer(nn.Unflatten, (1, (1, 1, self.width)))] if self.flat else []

    def conv(self, out_channels: int, kernel: int) -> list[_Layer]:
        # "same" padding (odd kernels); a 1-D signal gets 1×k kernels
        kh = 1 if self.flat else kernel
        weights = self.channels * out_channels * kh * kernel + out_channels
        layer = _Layer(nn.Conv2d, (self.channels, out_channels, (kh, kernel)),
                       (("padding", (kh // 2, kernel // 2)),), weights)
        self.channels = out_channels
        return [layer, _Layer(nn.BatchNorm2d, (out_channels,), parameters=2 * out_channels), _Layer(nn.ReLU)]

    def pool(self, kernel: int, stride: int, padding: int) -> list[_Layer]:
        def side(size: int) -> tuple[int, int, int, int]:
            if size < 2:  # pooling would shrink it below one pixel (or do nothing): leave the side alone
                return 1, 1, 0, size
            k = min(kernel, size + 2 * padding)
            p = min(padding, k // 2)
            return k, stride, p, (size + 2 * p - k) // stride + 1

        kh, sh, ph, new_h = side(self.height)
        kw, sw, pw, new_w = side(self.width)
        if (kh, kw) == (1, 1):
            return []
        self.height, self.width = new_h, new_w
        return [_Layer(nn.MaxPool2d, ((kh, kw),), (("stride", (sh, sw)), ("padding", (ph, pw))))]

    @property
    def features(self) -> int:
        return self.channels * self.height * self.width


def _fully_connected(name, shape, num_classes, width, depth) -> list[_Layer]:
    in_features = 1
    for s in shape:
        in_features *= s
    units = _scaled(512, width)
    layers = [_Layer(nn.Flatten)]
    for _ in range(_scaled(_DENSE_LAYERS[name], depth)):
        layers += _dense_block(in_features, units, None)
        in_features = units
    layers.append(_linear(in_features, num_classes))
    return layers


def _alexnet_like(shape, num_classes, width, depth, dropout) -> list[_Layer]:
    # Keras's 3×3 max-pool with stride 2 and "same" padding: size -> ceil(size / 2)
    tracker = _ConvShape(shape)
    layers = tracker.prefix()
    for _ in range(_scaled(_ALEX_BLOCKS, depth)):
        layers += tracker.conv(_scaled(_ALEX_CHANNELS, width), _ALEX_KERNEL)
        layers += tracker.pool(3, 2, 1)
    layers.append(_Layer(nn.Flatten))
    in_features = tracker.features
    for units in _ALEX_DENSE:
        layers += _dense_block(in_features, _scaled(units, width), dropout)
        in_features = _scaled(units, width)
    layers.append(_linear(in_features, num_classes))
    return layers


def _vgg_like(shape, num_classes, width, depth, dropout, conv_dropout=False) -> list[_Layer]:
    tracker = _ConvShape(shape)
    layers = tracker.prefix()
    first = True
    for channels, convs in _VGG_STACKS:
        count = _scaled(convs, depth)
        for index in range(count):
            layers += tracker.conv(_scaled(channels, width), 3)
            if conv_dropout and index < count - 1:
                layers.append(_Layer(nn.Dropout, (_VGG_FIRST_DROPOUT if first else _VGG_CONV_DROPOUT,)))
            first = False
        layers += tracker.pool(2, 2, 0)
    layers.append(_Layer(nn.Flatten))
    if conv_dropout and dropout:
        layers.append(_Layer(nn.Dropout, (dropout,)))
    layers += _dense_block(tracker.features, _scaled(_VGG_DENSE, width), dropout)
    layers.append(_linear(_scaled(_VGG_DENSE, width), num_classes))
    return layers


def _repeated_blocks(key: str, depth: float) -> int:
    """How many blocks ``depth`` makes the network repeat (hidden layers, or convolutions with their BatchNorm)."""
    if key in _DENSE_LAYERS:
        return _scaled(_DENSE_LAYERS[key], depth)
    if key in ("C1", "C3"):
        return _scaled(_ALEX_BLOCKS, depth)
    return sum(_scaled(convs, depth) for _, convs in _VGG_STACKS)


def _plan(name, input_shape, num_classes, width=1.0, depth=1.0, dropout=0.5, conv_dropout=False) -> list[_Layer]:
    """The checked arguments' network as a list of layers, none of them built yet."""
    key = model_name(name)
    shape = _check_shape(input_shape)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise HessgapError(f"num_classes must be an integer ≥ 2, got {num_classes!r}")
    width = _check_scale("width", width)
    depth = _check_scale("depth", depth)
    dropout = float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise HessgapError(f"dropout must be in [0, 1), got {dropout}")
    _checks.flag(conv_dropout, "conv_dropout")
    blocks = _repeated_blocks(key, depth)
    if blocks > MAX_BLOCKS:
        raise HessgapError(
            f"depth={depth:g} gives {key} {_count(blocks)} repeated blocks (at depth 1: {_repeated_blocks(key, 1.0)}); "
            f"hessgap builds at most {MAX_BLOCKS:,} (each is a few Python modules, built and run one call at a time: "
            "more would take hours); use a smaller depth"
        )
    if key in _DENSE_LAYERS:
        return _fully_connected(key, shape, num_classes, width, depth)
    if key in ("C1", "C3"):
        return _alexnet_like(shape, num_classes, width, depth, dropout)
    return _vgg_like(shape, num_classes, width, depth, dropout, conv_dropout)


def device_memory(device: str | torch.device) -> int | None:
    """Bytes of memory of ``device`` (the machine's physical memory for the CPU), or None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
            return None
    return None


def check_fits_memory(what: str, parameters: int, device: str | torch.device, copies: int = 1,
                      held: str = "") -> None:
    """Refuse a network of ``parameters`` numbers of the default dtype when ``copies`` of them (the weights, and
    for training their gradients and the optimizer's state, which ``held`` names) exceed the memory of
    ``device``: a lower bound of what the run needs, so the refusal is never wrong."""
    device = torch.device(device)
    memory = device_memory(device)
    dtype = torch.get_default_dtype()
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    needed = parameters * itemsize * copies
    if memory is None or needed <= memory:
        return
    total = f"; {held} holds {copies} copies of them, {_gigabytes(needed)}" if copies > 1 else ""
    raise HessgapError(
        f"{what} has {_count(parameters)} parameters, {_gigabytes(parameters * itemsize)} as {dtype}{total}: more "
        f"than the {_gigabytes(memory)} of {_owner(device)} memory; use a smaller width or depth (1.0 is the "
        "paper's network)"
    )


def _gigabytes(size: int) -> str:
    return f"{Decimal(size) / 10**9:.3g} GB"


def _owner(device: torch.device) -> str:
    return "this machine's" if device.type == "cpu" else f"{device}'s"


def parameter_count(name: str, input_shape: Sequence[int], num_classes: int, width: float = 1.0,
                    depth: float = 1.0) -> int:
    """The number of parameters :func:`build_model` gives these arguments, exactly, without building anything
    (so for any width: a Python integer, no tensor allocated)."""
    return sum(layer.parameters for layer in _plan(name, input_shape, num_classes, width, depth))


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    width: float = 1.0,
    depth: float = 1.0,
    dropout: float = 0.5,
    *,
    init: str = "pytorch",
    conv_dropout: bool = False,
) -> nn.Sequential:
    """One of the paper's networks, adapted to ``input_shape`` ((C, H, W) or (L,)) and ``num_classes``.

    F1/F2: fully connected, 5/7 × [Linear 512, BatchNorm1d, ReLU]. C1/C3: AlexNet-like, 2 × [Conv 64 5×5,
    BN, ReLU, MaxPool 3×3 stride 2] → dense 384 → dense 192 (BN, ReLU, dropout each). C2/C4: VGG-like conv
    3×3 stacks 2×64, 2×128, 3×256, 3×512, 3×512 with BN, ReLU and a 2×2 max-pool after each stack, then
    dense 512 (BN, ReLU, dropout). C1 and C3 (and C2 and C4) differ only in the class count, which comes
    from the data. ``dropout`` applies to the C nets' dense layers (0 leaves the Dropout layers out).
    ``conv_dropout=True`` adds the authors' dropout between C2/C4's convolutions (and before their dense
    layer); the other networks have none, as in the authors' code, and are unchanged by it.
    ``init``: "pytorch" (PyTorch's default) or "glorot" (Glorot-uniform weights and zero biases of every
    Linear and Conv2d, Keras's default and so the paper's); seed with ``torch.manual_seed`` before calling.
    """
    plan = _plan(name, input_shape, num_classes, width, depth, dropout, conv_dropout)
    _checks.choice(init, INIT_NAMES, "initialization")
    check_fits_memory(f"{model_name(name)} (width {float(width):g}, depth {float(depth):g})",
                      sum(layer.parameters for layer in plan), torch.get_default_device())
    model = nn.Sequential(*(layer.build() for layer in plan))
    if init == "glorot":
        glorot_(model)
    return model


def glorot_(model: nn.Module) -> nn.Module:
    """Glorot-uniform weights (Keras's ``glorot_uniform``: U(±√(6 / (fan_in + fan_out))), fans counting the
    kernel's receptive field) and zero biases for every Linear and Conv layer of ``model``, in place."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (the n of the paper's x ∈ R^n)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
