"""The digests a landscape's run folder is checked against: the model's parameters and buffers apart, every
byte and boundary of the batches, and the loss function's identity (what tells two of them apart, and what
cannot be told)."""

import functools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessgap.curvature.objective import LossOverData
from hessgap.landscape.fingerprint import UNVERIFIABLE, data_digest, describe, loss_identity, model_digest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_digest_tells_parameters_from_buffers(ref):
    model = ref.mlp()
    before = model_digest(model)
    assert before == model_digest(ref.mlp())  # another object, the same state
    with torch.no_grad():
        model[1].weight[[0, 1]] = model[1].weight[[1, 0]].clone()  # same count, sum and norm
    swapped = model_digest(model)
    assert swapped["parameters"] != before["parameters"] and swapped["buffers"] == before["buffers"]
    model[2].running_var.mul_(1.5)
    assert model_digest(model)["buffers"] != swapped["buffers"]
    model[1].bias.requires_grad_(False)  # another set of trainable parameters moves other entries
    assert model_digest(model)["parameters"] != swapped["parameters"]


def _digest(model, data, **options):
    return data_digest(LossOverData(model, data, **options))


def test_data_digest_covers_every_byte_and_every_batch_boundary(ref):
    model, data = ref.mlp(), ref.batches((3, 4))
    digest = _digest(model, data)
    assert digest == _digest(model, [(x.clone(), y.clone()) for x, y in data])
    rounded = [(x.float(), y) for x, y in data]  # float32 batches are evaluated (and hashed) cast to float64
    assert _digest(model, rounded) == _digest(model, [(x.double(), y) for x, y in rounded])
    changed = [(x.clone(), y.clone()) for x, y in data]
    changed[1][1][0] = (changed[1][1][0] + 1) % 3  # one label
    assert _digest(model, changed) != digest
    inputs, labels = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    assert _digest(model, [(inputs, labels)]) != digest  # the same samples in one batch
    assert _digest(model, data[::-1]) != digest
    assert _digest(model, data, max_batches=2) == _digest(model, data[:2])  # only the batches used
    assert _digest(model, data, max_batches=2) != digest


def test_data_digest_of_mapping_batches_names_the_keys(ref):
    model = ref.mlp()
    x, y = torch.randn(4, 3, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    one = LossOverData(model, [{"input": x, "labels": y}], compute_loss=lambda m, b: F.cross_entropy(m(b["input"]),
                                                                                                    b["labels"]))
    other = LossOverData(model, [{"inputs": x, "labels": y}], compute_loss=lambda m, b: F.cross_entropy(
        m(b["inputs"]), b["labels"]))
    assert data_digest(one) != data_digest(other)


def test_loss_identity_of_modules_functions_and_partials():
    assert loss_identity(None) == "default"
    assert loss_identity(F.cross_entropy) == "torch.nn.functional.cross_entropy"
    assert loss_identity(nn.CrossEntropyLoss()) == loss_identity(nn.CrossEntropyLoss())
    assert loss_identity(nn.CrossEntropyLoss()) != loss_identity(nn.CrossEntropyLoss(label_smoothing=0.1))
    weighted = [loss_identity(nn.CrossEntropyLoss(weight=torch.tensor([1.0, w, 1.0]))) for w in (2.0, 3.0)]
    assert weighted[0] != weighted[1] and "state sha256:" in weighted[0]
    assert loss_identity(nn.MSELoss()) != loss_identity(nn.L1Loss())
    smoothed = [loss_identity(functools.partial(F.cross_entropy, label_smoothing=s)) for s in (0.1, 0.2)]
    assert smoothed[0] != smoothed[1] and smoothed[0].startswith("functools.partial(torch.nn.functional.cross_entropy")


def _scaled(scale):
    return lambda outputs, targets: scale * F.cross_entropy(outputs, targets)


def test_loss_identity_of_lambdas_and_closures():
    assert loss_identity(_scaled(2.0)) == loss_identity(_scaled(2.0))  # made twice, as after a restart
    assert loss_identity(_scaled(2.0)) != loss_identity(_scaled(3.0))
    assert loss_identity(_scaled(torch.tensor(2.0))) != loss_identity(_scaled(torch.tensor(3.0)))
    assert loss_identity(_scaled(np.array([2.0]))) != loss_identity(_scaled(np.array([3.0])))
    plus = lambda outputs, targets: F.cross_entropy(outputs, targets) + 1.0  # noqa: E731
    times = lambda outputs, targets: F.cross_entropy(outputs, targets) * 1.0  # noqa: E731
    assert loss_identity(plus) != loss_identity(times)
    assert "test_landscape_fingerprint._scaled.<locals>.<lambda> (code sha256:" in loss_identity(_scaled(2.0))
    unknown = loss_identity(_scaled(random.Random(0)))
    assert unknown.startswith(UNVERIFIABLE) and "closes over Random" in unknown

    def recursive(outputs, targets):  # refers to itself through its closure
        return F.cross_entropy(outputs, targets) if recursive else None

    assert loss_identity(recursive).startswith(UNVERIFIABLE)


def test_describe_never_raises_and_keeps_plain_values(ref):
    assert describe({"steps": 3, "span": (-1, 1), "out": None}) == {"steps": 3, "span": [-1, 1], "out": None}
    assert describe(np.int64(5)) != describe(np.int64(6))
    assert describe(ref.mlp()) == describe(ref.mlp()) != describe(ref.mlp(seed=1))
    assert describe(torch.empty(3, device="meta")).startswith("Tensor (no digest")
    assert describe(object()) == "object"
