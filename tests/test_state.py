"""preserved(): a model comes back exactly as it was (bits, buffers, gradients, modes), also on error."""

import pytest
import torch
from torch import nn

import hessgap
from hessgap import preserved
from hessgap.curvature.objective import LossOverData

from oracles import batchnorm_dropout_mlp, unequal_batches


def test_preserved_restores_bits_buffers_grads_and_modes_even_on_error():
    model = batchnorm_dropout_mlp().train()
    model[1].running_mean.fill_(0.25)
    model[4].eval()  # a mixed mode that must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, _, _ = unequal_batches()
    with pytest.raises(RuntimeError, match="inside"):
        with preserved(model, train_mode=True) as centre:
            assert model.training and set(centre) == {n for n, _ in model.named_parameters()}
            LossOverData(model, batches).value()  # train-mode BatchNorm moves the running stats
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            raise RuntimeError("inside")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training and not model[4].training
    assert all(p.grad is None for p in model.parameters())


def test_preserved_defaults_to_eval_mode():
    model = batchnorm_dropout_mlp().train()
    with preserved(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())


def test_a_graph_retained_across_an_hvp_stays_usable():
    # restoring the parameters must not invalidate autograd graphs the caller still holds
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    batches, x, y = unequal_batches()
    loss = nn.functional.cross_entropy(model(x), y)
    n = sum(p.numel() for p in model.parameters())
    hessgap.hvp(model, batches, torch.randn(2, n))
    loss.backward()  # raises "modified by an inplace operation" if the restore bumped the versions
    assert all(p.grad is not None for p in model.parameters())


def test_preserved_rng_puts_python_numpy_and_torch_generators_back_also_on_error():
    import random

    import numpy as np

    from hessgap._state import preserved_rng

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    with pytest.raises(RuntimeError, match="inside"):
        with preserved_rng(devices=[torch.device("cpu")]):
            random.random(), np.random.rand(3), torch.randn(5)
            random.seed(7)
            raise RuntimeError("inside")
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected
