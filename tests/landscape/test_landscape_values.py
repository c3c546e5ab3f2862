"""Surfaces around one model against per-point functional_call in float64: every direction kind, both
engines, BatchNorm in eval and train mode, accuracy, unequal batches, the model left as it was."""

import numpy as np
import pytest
import torch
from torch import nn

import hessgap.landscape
from hessgap.landscape import landscape

pytestmark = pytest.mark.usefixtures("one_thread")

ENGINES = ("stack", "functional")


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def assert_unchanged(model, before):
    state, modes = before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_random_plane_matches_per_point_reference(network, engine, ref):
    model, data = (ref.mlp(), ref.batches((3, 4))) if network == "mlp" else (ref.cnn(), ref.batches((2, 8, 8)))
    before = snapshot(model)
    result = landscape(model, data, steps=(4, 3), span=((-1, 1), (-0.5, 1.0)), engine=engine, seed=3)
    assert result.engine == engine and result.kind == "random" and result.dims == 2
    assert result.loss.shape == (3, 4) and result.accuracy.shape == (3, 4)
    np.testing.assert_allclose(result.x, [-1, -1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(result.y, [-0.5, 0.25, 1.0])
    loss, accuracy = ref.surface(model, data, result.directions, result.x, result.y)
    np.testing.assert_allclose(result.loss, loss, rtol=1e-10)
    np.testing.assert_allclose(result.accuracy, accuracy)
    assert result.samples == 40
    assert_unchanged(model, before)


def test_filter_normalization_and_biasbn(ref):
    model = ref.mlp()
    result = landscape(model, ref.batches((3, 4)), steps=2, seed=5)
    sizes = [p.numel() for p in model.parameters()]
    for direction in result.directions:
        for piece, (name, weights) in zip(torch.split(direction, sizes), model.named_parameters()):
            if weights.dim() <= 1:  # biases and BatchNorm: ignored
                assert torch.count_nonzero(piece) == 0, name
            else:
                rows = piece.view_as(weights).reshape(weights.shape[0], -1)
                expected = weights.detach().reshape(weights.shape[0], -1).norm(dim=1)
                torch.testing.assert_close(rows.norm(dim=1), expected, rtol=1e-8, atol=1e-8)
    assert not torch.equal(result.directions[0], result.directions[1])
    again = landscape(model, ref.batches((3, 4)), steps=2, seed=5)
    assert torch.equal(again.directions, result.directions)  # the seed decides


@pytest.mark.parametrize("normalization", ["layer", "none"])
def test_layer_and_no_normalization_with_biases_kept(normalization, ref):
    model, data = ref.mlp(), ref.batches((3, 4))
    result = landscape(model, data, steps=3, normalization=normalization, ignore=None, seed=2)
    sizes = [p.numel() for p in model.parameters()]
    for piece, (name, weights) in zip(torch.split(result.directions[0], sizes), model.named_parameters()):
        piece = piece.view_as(weights)
        if normalization == "layer" and weights.dim() > 1:
            torch.testing.assert_close(piece.norm(), weights.detach().norm())
        elif normalization == "layer":  # Li et al.: a 1-D tensor's direction is the weights themselves
            assert torch.equal(piece, weights.detach()), name
        else:
            assert torch.count_nonzero(piece) == piece.numel()  # the Gaussian draw, biases included
    loss, _ = ref.surface(model, data, result.directions, result.x, result.y)
    np.testing.assert_allclose(result.loss, loss, rtol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_line(engine, ref):
    model, data = ref.cnn(), ref.batches((2, 8, 8))
    result = landscape(model, data, dims=1, steps=5, span=0.5, engine=engine)
    assert result.y is None and result.loss.shape == (5,) and result.directions.shape[0] == 1
    loss, accuracy = ref.surface(model, data, result.directions, result.x)
    np.testing.assert_allclose(result.loss, loss, rtol=1e-10)
    np.testing.assert_allclose(result.accuracy, accuracy)
    assert result.loss[2] == pytest.approx(ref.state(model, {}, data)[0], rel=1e-12)  # x = 0 is the model


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_batchnorm_train_mode_normalizes_each_point_with_its_batch(network, engine, ref):
    model, data = (ref.mlp(), ref.batches((3, 4))) if network == "mlp" else (ref.cnn(), ref.batches((2, 8, 8)))
    before = snapshot(model)
    result = landscape(model, data, steps=3, batchnorm="train", ignore=None, engine=engine)
    loss, accuracy = ref.surface(model, data, result.directions, result.x, result.y, batchnorm="train")
    np.testing.assert_allclose(result.loss, loss, rtol=1e-10)
    eval_mode = landscape(model, data, steps=3, ignore=None, engine=engine)
    assert not np.allclose(eval_mode.loss, result.loss)
    assert_unchanged(model, before)  # running statistics untouched


def test_given_directions_as_tensor_list_and_line(ref):
    model, data = ref.mlp(), ref.batches((3, 4))
    n = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(9)
    flat = 0.1 * torch.randn(2, n, generator=generator, dtype=torch.float64)
    plane = landscape(model, data, directions=flat, steps=3)
    assert plane.kind == "tensors" and torch.equal(plane.directions, flat)
    loss, _ = ref.surface(model, data, flat, plane.x, plane.y)
    np.testing.assert_allclose(plane.loss, loss, rtol=1e-10)
    per_parameter = [list(torch.split(row, [p.numel() for p in model.parameters()])) for row in flat]
    per_parameter = [[d.view_as(p) for d, p in zip(row, model.parameters())] for row in per_parameter]
    again = landscape(model, data, directions=per_parameter, steps=3)
    np.testing.assert_allclose(again.loss, plane.loss, rtol=1e-12)
    line = landscape(model, data, directions=flat[0], steps=4)
    assert line.dims == 1
    loss, _ = ref.surface(model, data, flat[:1], line.x)
    np.testing.assert_allclose(line.loss, loss, rtol=1e-10)


def test_frozen_parameters_stay_and_directions_cover_the_trainable_ones(ref):
    model, data = ref.mlp(), ref.batches((3, 4))
    model[1].weight.requires_grad_(False)
    result = landscape(model, data, steps=3)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result.directions.shape == (2, n)
    loss, _ = ref.surface(model, data, result.directions, result.x, result.y)
    np.testing.assert_allclose(result.loss, loss, rtol=1e-10)


def test_test_data_and_non_class_targets(ref):
    model, data = ref.mlp(), ref.batches((3, 4))
    test = ref.batches((3, 4), samples=24, sizes=(24,), seed=7)
    result = landscape(model, data, test_data=test, steps=3)
    loss, accuracy = ref.surface(model, test, result.directions, result.x, result.y)
    np.testing.assert_allclose(result.test_loss, loss, rtol=1e-10)
    np.testing.assert_allclose(result.test_accuracy, accuracy)
    assert result.test_samples == 24 and set(result.surfaces()) == {"train_loss", "train_accuracy", "test_loss",
                                                                      "test_accuracy"}
    regression = [(x, torch.randn(x.shape[0], 3, dtype=torch.float64)) for x, _ in data]
    mse = landscape(model, regression, steps=2, loss_fn=nn.MSELoss())
    assert mse.accuracy is None and np.isfinite(mse.loss).all()


def test_functional_engine_for_models_outside_the_stack(ref):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = ref.mlp()
            self.skip = nn.Linear(12, 3).double()

        def forward(self, x):
            return self.body(x) + self.skip(x.flatten(1))

    model, data = Residual(), ref.batches((3, 4))
    result = landscape(model, data, steps=3)
    assert result.engine == "functional" and "not a plain torch.nn.Sequential" in result.fallback_reason
    loss, _ = ref.surface(model, data, result.directions, result.x, result.y)
    np.testing.assert_allclose(result.loss, loss, rtol=1e-10)


def test_chunks_and_tiles_do_not_change_the_values(ref, monkeypatch):
    import hessgap.landscape.stack as stack

    model, data = ref.cnn(), ref.batches((2, 8, 8))
    whole = landscape(model, data, steps=4)
    monkeypatch.setattr(stack, "TILE_BYTES", 2048)  # a few samples and one point per tile
    tiled = landscape(model, data, steps=4, memory_budget=1)
    np.testing.assert_allclose(tiled.loss, whole.loss, rtol=1e-12)
    np.testing.assert_allclose(tiled.accuracy, whole.accuracy)


def test_the_package_is_callable_and_float32_agrees(ref):
    model, data = ref.mlp().float(), [(x.float(), y) for x, y in ref.batches((3, 4))]
    result = hessgap.landscape(model, data, steps=3)
    assert result.loss.dtype == np.float64 and result.directions.dtype == torch.float32
    reference = landscape(model.double(), [(x.double(), y) for x, y in data], directions=result.directions.double(),
                          steps=3, engine="functional")
    np.testing.assert_allclose(result.loss, reference.loss, rtol=1e-5)
    assert "LandscapeResult(random, 3 × 3 points" in repr(result)
