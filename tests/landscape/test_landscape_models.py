"""Between models: the paper's linear and curved paths and planes through three models, with BatchNorm running
statistics interpolated like the weights and extrapolated variances clamped at 0, against per-point references
(and against the parametric experiment's own interpolation)."""

import math

import numpy as np
import pytest
import torch

from hessgap.landscape import landscape

pytestmark = pytest.mark.usefixtures("one_thread")


def combined_state(states, coefficients):
    """Σ c_k · state_k for every floating entry, running variances clamped at 0, integers from the first."""
    out, clamped = {}, 0
    for key, value in states[0].items():
        if value.is_floating_point():
            mixed = sum(c * s[key] for c, s in zip(coefficients, states))
            if key.endswith("running_var"):
                clamped += int((mixed < 0).sum())
                mixed = mixed.clamp_min(0.0)
            out[key] = mixed
        else:
            out[key] = value
    return out, clamped


def path_coefficients(alpha, path):
    if path == "linear":
        return [1 - alpha, alpha]
    return [math.cos(alpha * math.pi / 2), math.sin(alpha * math.pi / 2)]


@pytest.mark.parametrize("engine", ["stack", "functional"])
@pytest.mark.parametrize("path", ["linear", "curved"])
@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_path_between_two_models(network, path, engine, ref):
    make, shape = (ref.mlp, (3, 4)) if network == "mlp" else (ref.cnn, (2, 8, 8))
    model_a, model_b, data = make(0), make(1), ref.batches(shape)
    before = {k: v.clone() for k, v in model_b.state_dict().items()}
    result = landscape(model_a, data, directions=model_b, path=path, steps=7, engine=engine)
    assert result.kind == "model" and result.dims == 1 and result.settings["path"] == path
    np.testing.assert_allclose(result.x, np.linspace(-1, 2, 7))
    states = [model_a.state_dict(), model_b.state_dict()]
    for i, alpha in enumerate(result.x):
        state, clamped = combined_state(states, path_coefficients(alpha, path))
        loss, accuracy = ref.state(model_a, state, data)
        assert result.loss[i] == pytest.approx(loss, rel=1e-10)
        assert result.accuracy[i] == pytest.approx(accuracy)
        assert result.clamped_variances[i] == clamped
    assert result.clamped_variances.max() > 0  # the extrapolated ends clamp some variances
    assert result.loss[2] == pytest.approx(ref.state(model_a, {}, data)[0], rel=1e-12)  # α = 0: x_A
    assert result.loss[4] == pytest.approx(ref.state(model_b, {}, data)[0], rel=1e-10)  # α = 1: x_B
    flat = torch.cat([(pb - pa).detach().reshape(-1) for pa, pb in zip(model_a.parameters(), model_b.parameters())])
    assert torch.equal(result.directions[0], flat)
    assert all(torch.equal(v, before[k]) for k, v in model_b.state_dict().items())


def test_same_semantics_as_the_parametric_experiment(ref):
    """The experiment of Figures 3 and 7 can move onto the batched evaluation without changing a number."""
    from hessgap.experiments.parametric import coefficients, interpolate_state

    model_a, model_b, data = ref.mlp(0), ref.mlp(1), ref.batches((3, 4))
    states = [model_a.state_dict(), model_b.state_dict()]
    for path in ("linear", "curved"):
        result = landscape(model_a, data, directions=model_b, path=path, steps=5)
        for i, alpha in enumerate(result.x):
            state, clamped = interpolate_state(*states, *coefficients(float(alpha), path))
            assert result.loss[i] == pytest.approx(ref.state(model_a, state, data)[0], rel=1e-10)
            assert result.clamped_variances[i] == clamped


def test_plane_through_three_models(ref):
    models = [ref.cnn(seed) for seed in range(3)]
    data = ref.batches((2, 8, 8))
    result = landscape(models[0], data, directions=models[1:], steps=3, span=(0, 1))
    assert result.kind == "models" and result.loss.shape == (3, 3)
    states = [m.state_dict() for m in models]
    for j, b in enumerate(result.y):
        for i, a in enumerate(result.x):
            state, _ = combined_state(states, [1 - a - b, a, b])
            assert result.loss[j, i] == pytest.approx(ref.state(models[0], state, data)[0], rel=1e-10)
    assert result.loss[0, 2] == pytest.approx(ref.state(models[1], {}, data)[0], rel=1e-10)  # (1, 0): x_B
    assert result.loss[2, 0] == pytest.approx(ref.state(models[2], {}, data)[0], rel=1e-10)  # (0, 1): x_C


def test_a_hugging_face_model_on_dict_batches():
    """Token batches with unequal padding: every point is the token-weighted mean loss, as LossOverData has it."""
    pytest.importorskip("transformers")
    from torch.func import functional_call

    from hessgap.curvature.objective import LossOverData

    from oracles import tiny_hf, token_batches

    model, data = tiny_hf("gpt2"), token_batches(causal=True)
    result = landscape(model, data, dims=1, steps=3, span=0.5, seed=0)
    assert result.engine == "functional" and result.accuracy is None
    params = dict(model.named_parameters())
    sizes = [p.numel() for p in params.values()]
    for x, value in zip(result.x, result.loss):
        moved = {n: p.detach() + x * d.view_as(p) for (n, p), d in
                 zip(params.items(), result.directions[0].to(torch.float64).split(sizes))}
        with torch.no_grad():
            probe = LossOverData(model, data)
            total = weight = 0.0
            for batch in probe.batches():
                out = functional_call(model, moved, batch.args, batch.kwargs)
                total += float(probe.loss_of_outputs(out, batch)) * batch.weight
                weight += batch.weight
        assert value == pytest.approx(total / weight, rel=1e-10)
