"""DataSource: every pass of a multi-pass call sees the same data, or the call says why it cannot."""

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import hessgap
from hessgap import HessgapError

from oracles import batchnorm_dropout_mlp, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(samples=96, batch=16):
    torch.manual_seed(3)
    model = randomize_batchnorm(batchnorm_dropout_mlp()).eval()
    x, y = torch.randn(samples, 5), torch.randint(0, 3, (samples,))
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, samples, batch)]
    return model, batches, x, y


def test_one_shot_iterator_with_max_batches_keeps_its_first_batches():
    """Was: sharpness(m, iter(batches), max_batches=1) = 0.0 (later passes saw other batches, then none)."""
    model, batches, _, _ = _setup()
    from_list = hessgap.sharpness(model, batches, max_batches=1, max_iter=3)
    from_iterator = hessgap.sharpness(model, iter(batches), max_batches=1, max_iter=3)
    assert from_list.value > 0
    assert from_iterator.value == pytest.approx(from_list.value, rel=1e-6)


def test_operator_over_an_iterator_gives_the_same_products_every_call():
    """Was: HessianOperator(m, iter(batches), max_batches=1) returned different products on two calls."""
    model, batches, _, _ = _setup()
    operator = hessgap.HessianOperator(model, iter(batches), max_batches=1)
    V = torch.randn(2, operator.n)
    first, second = operator.matmat(V), operator.matmat(V)
    assert torch.equal(first, second)
    expected = hessgap.HessianOperator(model, batches[:1]).matmat(V)
    torch.testing.assert_close(first, expected)


def test_shuffled_loader_with_max_batches_is_one_function_per_call():
    """Was: 4.17, 0.97, 3.00, 5.67 on repeated calls: every pass of one call drew other batches."""
    model, _, x, y = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    operator = hessgap.HessianOperator(model, loader, max_batches=2)
    V = torch.randn(1, operator.n)
    assert torch.equal(operator.matmat(V), operator.matmat(V))
    result = hessgap.sharpness(model, loader, max_batches=2, max_iter=4)
    assert result.history[0] == pytest.approx(result.loss) and result.max_loss == max(result.history)


def test_shuffled_loader_over_all_data_is_the_same_function_as_a_fixed_one():
    model, batches, x, y = _setup()
    shuffled = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    a = hessgap.sharpness(model, shuffled, max_iter=3)
    b = hessgap.sharpness(model, batches, max_iter=3)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.value == pytest.approx(b.value, rel=1e-4)


def test_one_shot_generator_without_max_batches_says_what_to_do():
    """Was: 'the data loader yielded no batches' on the second pass (it did yield, on the first)."""
    model, batches, _, _ = _setup()
    with pytest.raises(HessgapError, match="one-shot iterator.*cache_batches=True"):
        hessgap.sharpness(model, (b for b in batches), max_iter=2)
    cached = hessgap.sharpness(model, (b for b in batches), max_iter=2, cache_batches=True)
    assert cached.value == pytest.approx(hessgap.sharpness(model, batches, max_iter=2).value, rel=1e-6)
    operator = hessgap.HessianOperator(model, iter(batches))
    V = torch.randn(1, operator.n)
    operator.matmat(V)
    with pytest.raises(HessgapError, match="one-shot iterator"):
        operator.matmat(V)


class _Augmented(IterableDataset):
    """Every pass adds fresh noise to the inputs: another function each pass."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(0, len(self.x), 16):
            yield self.x[i : i + 16] + 0.1 * torch.randn_like(self.x[i : i + 16]), self.y[i : i + 16]


def test_data_that_changes_between_passes_raises():
    model, _, x, y = _setup()
    with pytest.raises(HessgapError, match="data changed between passes"):
        hessgap.sharpness(model, _Augmented(x, y), max_iter=3)
    fixed = hessgap.sharpness(model, _Augmented(x, y), max_iter=3, cache_batches=True)
    assert fixed.value > 0
