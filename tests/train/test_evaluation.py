"""evaluate: the loss and accuracy the training loop records, against a direct computation."""

import pytest
import torch
import torch.nn.functional as F

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
