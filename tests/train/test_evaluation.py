"""evaluate: the loss and accuracy the training loop records, against a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from hessgap.errors import HessgapError
from hessgap.train import build_model, evaluate, make_loader

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evaluate_matches_a_direct_computation(digits):
    torch.manual_seed(1)
    model = build_model("C1", (1, 8, 8), 10, width=0.1).train()
    x, y = digits.test.tensors
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    loss, acc = evaluate(model, make_loader(digits.test, 97, shuffle=False))  # unequal last batch
    assert loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
    assert acc == pytest.approx(float((out.argmax(1) == y).double().mean()))
    assert model.training  # mode restored


def test_evaluate_restores_every_modules_own_mode_also_on_error(digits):
    model = build_model("C1", (1, 8, 8), 10, width=0.1).train()
    frozen = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)][0]
    frozen.eval()  # a submodule the caller keeps in eval mode inside a model in train mode
    before = [m.training for m in model.modules()]
    evaluate(model, make_loader(digits.test, 97, shuffle=False))
    assert [m.training for m in model.modules()] == before

    def broken_loss(outputs, targets):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        evaluate(model, make_loader(digits.test, 97, shuffle=False), loss_fn=broken_loss)
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_narrow_integer_targets_give_the_int64_results_exactly(digits, dtype):
    """Was: RuntimeError 'expected target dtype to be Long or Byte, but got Int' from inside cross_entropy."""
    model = build_model("C1", (1, 8, 8), 10, width=0.1)
    x, y = digits.test.tensors
    wide = evaluate(model, make_loader(digits.test, 97, shuffle=False))
    narrow = evaluate(model, make_loader(torch.utils.data.TensorDataset(x, y.to(dtype)), 97, shuffle=False))
    assert narrow == wide  # bit for bit: the same loss over the same class indices


def test_float_targets_of_class_indices_are_refused_clearly(digits):
    model = build_model("C1", (1, 8, 8), 10, width=0.1)
    x, y = digits.test.tensors
    with pytest.raises(HessgapError, match="floating targets of shape"):
        evaluate(model, make_loader(torch.utils.data.TensorDataset(x, y.float()), 97, shuffle=False))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_point_whose_loss_is_not_finite_has_no_accuracy(digits, poison):
    """Was: NaN loss with accuracy 0.0914 on the digits test split, the share of class-0 targets (the argmax
    of NaN logits is class 0)."""
    model = build_model("F1", (1, 8, 8), 10, width=0.02)
    with torch.no_grad():
        model[-1].bias[0] = poison  # the outputs are NaN or ±inf, the loss NaN
    loss, acc = evaluate(model, make_loader(digits.test, 97, shuffle=False))
    assert math.isnan(loss) and math.isnan(acc)


def test_the_training_loop_records_no_accuracy_for_a_diverged_epoch(digits):
    """The loop evaluates through the same sums (also across ranks): a diverged epoch's accuracies are NaN,
    written to its history as null."""
    from hessgap.train import TrainConfig, train

    result = train(TrainConfig(model="F1", dataset="digits", width=0.02, batch_size=64, epochs=2, lr=1e12,
                               optimizer="sgd"), dataset=digits, progress=False)
    last = result.history[-1]
    assert result.diverged is not None
    assert math.isnan(last["train_loss"]) and math.isnan(last["train_acc"]) and math.isnan(last["test_acc"])
