"""LossOverData (the mean loss over a loader) and preserved() (exact model restoration)."""

import pytest
import torch
from torch import nn

from hessgap import HessgapError, NonFiniteError, preserved
from hessgap.curvature.objective import LossOverData


def _model():
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 3))


def _data(n=23, batch=8):
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)], x, y


def test_value_is_the_sample_mean_over_unequal_batches():
    model = _model().eval()
    batches, x, y = _data()
    expected = nn.functional.cross_entropy(model(x), y).item()
    assert LossOverData(model, batches).value() == pytest.approx(expected, rel=1e-6)


def test_gradient_matches_autograd_on_all_data_in_float64():
    model = _model().double().eval()
    batches, x, y = _data()
    value, grads = LossOverData(model, batches).value_and_grad()
    loss = nn.functional.cross_entropy(model(x.double()), y)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    assert value == pytest.approx(loss.item(), rel=1e-12)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_single_batch_and_max_batches():
    model = _model().eval()
    batches, x, y = _data()
    single = LossOverData(model, (x, y)).value()
    first_two = LossOverData(model, batches, max_batches=2).value()
    assert single == pytest.approx(nn.functional.cross_entropy(model(x), y).item(), rel=1e-6)
    assert first_two == pytest.approx(nn.functional.cross_entropy(model(x[:16]), y[:16]).item(), rel=1e-6)


def test_cached_batches_give_the_same_value():
    model = _model().eval()
    batches, _, _ = _data()
    objective = LossOverData(model, iter(batches)).cache_batches()
    assert objective.value() == objective.value()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: LossOverData(m, []).value(), "no batches"),
        (lambda m: LossOverData(m, [(torch.randn(3, 5), torch.zeros(2, dtype=torch.long))]).value(), "3 inputs but 2"),
        (lambda m: LossOverData(m, [torch.randn(3, 5)]).value(), r"\(inputs, targets\) pair"),
        (lambda m: LossOverData(m, [(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))],
                                loss_fn=nn.CrossEntropyLoss(reduction="none")).value(), "not a scalar"),
        (lambda m: LossOverData(m, [], max_batches=0), "max_batches"),
        (lambda m: LossOverData(m, 3), "iterable"),
    ],
)
def test_bad_data_is_named(make, message):
    with pytest.raises(HessgapError, match=message):
        make(_model().eval())


def test_no_trainable_parameters_and_mixed_dtypes():
    frozen = _model().requires_grad_(False)
    with pytest.raises(HessgapError, match="no trainable parameters"):
        LossOverData(frozen, [])
    mixed = _model()
    mixed[0].double()
    with pytest.raises(HessgapError, match="several dtypes"):
        LossOverData(mixed, [])


def test_non_finite_loss_is_an_error():
    model = _model().eval()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    batches, _, _ = _data()
    with pytest.raises(NonFiniteError, match="nan"):
        LossOverData(model, batches).value()


def test_preserved_restores_bits_buffers_grads_and_modes_even_on_error():
    model = _model().train()
    model[1].running_mean.fill_(0.25)
    model[4].eval()  # a mixed mode that must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, _, _ = _data()
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
    model = _model().train()
    with preserved(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())


def test_non_finite_gradient_is_an_error():
    # sqrt at 0: a finite loss (0) whose gradient is not finite; the check must look at the gradient itself
    model = nn.Sequential(nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    batch = (torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
    objective = LossOverData(model, batch, loss_fn=lambda out, target: (out - target).abs().sqrt().mean())
    assert objective.value() == 0.0
    with pytest.raises(NonFiniteError, match="gradient"):
        objective.value_and_grad()


def test_a_graph_retained_across_an_hvp_stays_usable():
    # restoring the parameters must not invalidate autograd graphs the caller still holds
    import hessgap

    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    batches, x, y = _data()
    loss = nn.functional.cross_entropy(model(x), y)
    n = sum(p.numel() for p in model.parameters())
    hessgap.hvp(model, batches, torch.randn(2, n))
    loss.backward()  # raises "modified by an inplace operation" if the restore bumped the versions
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("max_batches", [0, -1, 1.5, True, "2"])
def test_max_batches_must_be_a_positive_integer(max_batches):
    with pytest.raises(HessgapError, match="max_batches must be a positive number of batches"):
        LossOverData(_model(), [], max_batches=max_batches)
