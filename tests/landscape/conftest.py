"""Tiny float64 networks, data in unequal batches, and the independent reference every landscape is checked
against: one ``torch.func.functional_call`` per point with the point's full state, summed sample by sample.

Test modules reach the helpers through the ``ref`` fixture (conftest modules are not imported by name).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Running statistics and affine parameters away from their initial 0 and 1."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator, dtype=torch.float64))
            module.running_var.copy_(0.5 + torch.rand(size, generator=generator, dtype=torch.float64) * 1.5)
            module.weight.data.copy_(0.5 + torch.rand(size, generator=generator, dtype=torch.float64))
            module.bias.data.copy_(0.3 * torch.randn(size, generator=generator, dtype=torch.float64))
    return model


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Dropout(0.3), nn.Linear(6, 3),
    ).double()
    return _randomize_batchnorm(model, torch.Generator().manual_seed(seed + 100)).eval()


def make_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Flatten(), nn.Linear(20, 3),
    ).double()
    return _randomize_batchnorm(model, torch.Generator().manual_seed(seed + 100)).eval()


@pytest.fixture
def mlp():
    return make_mlp()


@pytest.fixture
def cnn():
    return make_cnn()


def batches(shape, samples: int = 40, sizes=(16, 16, 8), seed: int = 1, classes: int = 3):
    """``samples`` inputs of ``shape`` with class labels, cut into batches of unequal ``sizes``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, *shape, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    out, start = [], 0
    for size in sizes:
        out.append((inputs[start : start + size], labels[start : start + size]))
        start += size
    return out


@pytest.fixture
def mlp_data():
    return batches((3, 4))


@pytest.fixture
def cnn_data():
    return batches((2, 8, 8))


def evaluate_state(model: nn.Module, state: dict, data, batchnorm: str = "eval", loss_fn=None):
    """(mean loss, accuracy in percent) of ``model`` with ``state`` (parameters and buffers by name) over
    ``data``; with ``batchnorm="train"`` each batch is normalized with its own statistics (on copies of the
    buffers, so the model's stay untouched)."""
    loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="sum")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    if batchnorm == "train":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    total, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for inputs, targets in data:
                point = dict(state)
                if batchnorm == "train":
                    point.update({name: b.clone() for name, b in model.named_buffers()})
                    point.update({name: v.clone() for name, v in state.items() if name in dict(model.named_buffers())})
                outputs = functional_call(model, point, (inputs,))
                total += float(loss_fn(outputs, targets))
                correct += int((outputs.argmax(1) == targets).sum())
                count += inputs.shape[0]
    finally:
        for module, mode in modes:
            module.training = mode
    return total / count, 100.0 * correct / count


def offset_state(model: nn.Module, directions: torch.Tensor, coordinates) -> dict:
    """Parameters x0 + Σ_i coordinates[i]·directions[i] (directions flat over the trainable parameters)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
    state = {}
    offset = 0
    for name, p in zip(names, params):
        step = sum(c * d[offset : offset + p.numel()].view_as(p) for c, d in zip(coordinates, directions))
        state[name] = p + step
        offset += p.numel()
    return state


def reference_surface(model, data, directions, xs, ys=None, batchnorm="eval"):
    """Loss and accuracy at x0 + x·d1 (+ y·d2) on the grid, as (len(y), len(x)) arrays (or (len(x),))."""
    rows = [None] if ys is None else ys
    loss = np.zeros((len(rows), len(xs)))
    accuracy = np.zeros_like(loss)
    for j, y in enumerate(rows):
        for i, x in enumerate(xs):
            coordinates = [x] if y is None else [x, y]
            loss[j, i], accuracy[j, i] = evaluate_state(model, offset_state(model, directions, coordinates), data,
                                                        batchnorm)
    return (loss[0], accuracy[0]) if ys is None else (loss, accuracy)


@pytest.fixture
def ref():
    return SimpleNamespace(mlp=make_mlp, cnn=make_cnn, batches=batches, state=evaluate_state, offset=offset_state,
                           surface=reference_surface)
