"""Captures with dynamic batch and sequence sizes: a ragged loader is captured once, a batch outside a
capture's guards gets its own, a model that export cannot take with dynamic sizes is captured per shape,
and every product stays exact (explicit float64 Hessians, the generic path on Hugging Face models)."""

import pytest
import torch
from torch import nn

import hessgap
from hessgap import _extension
from hessgap.curvature.graph import plan as graph_plan

from graph_oracles import rel_err
from oracles import explicit_hessian, tiny_hf

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")]
D64 = torch.float64


@pytest.fixture
def captures(monkeypatch):
    """The captures made during the test, in order."""
    made = []
    real = graph_plan.capture

    def counting(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(graph_plan, "capture", counting)
    return made


def vectors(model, k=2, seed=0):
    n = sum(p.numel() for p in model.parameters())
    return torch.randn(k, n, dtype=D64, generator=torch.Generator().manual_seed(seed))


def token_loader(shapes, vocab=23, seed=0):
    """Hugging Face causal-LM batches of the given (rows, tokens), the last token of the first row padded."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows, length in shapes:
        ids = torch.randint(1, vocab, (rows, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, -1] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


@pytest.mark.parametrize("kind,tolerance", [("bert", 1e-10), ("gpt2", 1e-6)])
def test_a_ragged_loader_is_captured_once_and_its_products_are_exact(kind, tolerance, captures):
    """Batch sizes and sequence lengths all differ: one capture serves them (GPT-2 computes its own loss in
    float32, hence its tolerance)."""
    model = tiny_hf(kind)
    data = token_loader([(3, 9), (2, 4), (4, 7), (2, 11), (3, 5)])
    V = vectors(model)
    result = hessgap.hvp(model, data, V, return_info=True)
    assert result.path == "fused" and len(captures) == 1 and captures[0].dynamic
    assert len(captures[0].programs) == 5  # one concrete graph per batch shape
    assert result.capture_seconds == pytest.approx(captures[0].seconds)
    assert any("dynamic batch and sequence sizes" in note for note in result.notes)
    generic = hessgap.hvp(model, data, V, path="generic")
    assert rel_err(result.value, generic) <= tolerance
    again = hessgap.hvp(model, data, V, return_info=True)  # kept: nothing captured, no capture time
    assert len(captures) == 1 and again.capture_seconds == 0
    torch.testing.assert_close(again.value, result.value)


SCALE_OF_LENGTH = {3: 0.5, 6: 1.5, 7: 2.0}  # a table keyed by the sequence length


class LengthBranch(nn.Module):
    """Mean-pooled token embeddings; sequences longer than 4 tokens are doubled, so a capture made on a
    long sequence holds a guard on the length. ``table``: also scaled by a length looked up in a dict,
    which export cannot do with a symbolic length."""

    def __init__(self, table=False):
        super().__init__()
        self.embed, self.head, self.table = nn.Embedding(10, 4), nn.Linear(4, 3), table

    def forward(self, ids):
        h = torch.tanh(self.embed(ids))
        if ids.shape[1] > 4:
            h = 2 * h
        if self.table:
            h = h * SCALE_OF_LENGTH.get(ids.shape[1], 1.0)
        return self.head(h.mean(1))


def class_batches(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 10, s, generator=gen), torch.randint(0, 3, (s[0],), generator=gen)) for s in shapes]


def test_sizes_outside_a_captures_guards_get_a_capture_of_their_own(captures):
    """(2, 7) fits the capture of (3, 6); (4, 3) fails its guard on the length (the other branch of the
    model) and a row of one fails its batch range (export makes a size of 1 a number): three captures.
    Served by the wrong capture, the short batch's products would be off by a factor of 4."""
    torch.manual_seed(0)
    model = LengthBranch().double()
    data = class_batches([(3, 6), (2, 7), (4, 3), (1, 6)])
    V = vectors(model)
    result = hessgap.hvp(model, data, V, return_info=True)
    assert result.path == "fused" and len(captures) == 3 and all(c.dynamic for c in captures)
    assert rel_err(result.value, V @ explicit_hessian(model, data)) <= 1e-10


def test_a_model_export_cannot_take_with_dynamic_sizes_is_captured_per_shape(captures):
    torch.manual_seed(0)
    model = LengthBranch(table=True).double()
    data = class_batches([(3, 6), (2, 7), (4, 3)])
    V = vectors(model)
    result = hessgap.hvp(model, data, V, return_info=True)
    assert result.path == "fused" and len(captures) == 3
    assert not any(c.dynamic for c in captures)
    assert all("unhashable" in c.static_reason for c in captures)
    assert any("one capture per batch shape" in note and "unhashable" in note for note in result.notes)
    assert rel_err(result.value, V @ explicit_hessian(model, data)) <= 1e-10


class Residual(nn.Module):
    """``in_place``: the residual added in place; ``no_grad``: a scale computed under torch.no_grad(), from
    the data ("data") or from the activations, which depend on the parameters ("activations")."""

    def __init__(self, in_place=False, no_grad=None):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.in_place, self.no_grad = in_place, no_grad

    def forward(self, x):
        h = self.a(x)
        if self.in_place:
            h += x  # an in-place add on the path from the parameters to the loss
        else:
            h = h + x
        h = torch.tanh(h)
        if self.no_grad is not None:
            with torch.no_grad():  # autograd holds the scale constant
                scale = (x if self.no_grad == "data" else h).abs().mean() + 1
            h = h * scale
        return self.b(h)


def feature_batches(sizes=(6, 3, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, dtype=D64, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


@pytest.mark.parametrize("in_place,no_grad,decomposed", [(False, None, False), (True, None, True), (False, "data", True)])
def test_only_graphs_that_write_in_place_or_hold_regions_are_decomposed(in_place, no_grad, decomposed, captures,
                                                                      monkeypatch):
    """export's graph is functional unless the model writes in place or runs a no_grad region: only then do
    decompositions (a second trace) run, and the products are exact either way."""
    calls = []
    real = torch.export.ExportedProgram.run_decompositions

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", counting)
    torch.manual_seed(0)
    model = Residual(in_place, no_grad).double()
    data = feature_batches()
    V = vectors(model)
    result = hessgap.hvp(model, data, V, return_info=True)
    assert result.path == "fused" and len(captures) == 1 and captures[0].dynamic
    assert len(calls) == int(decomposed)
    assert rel_err(result.value, V @ explicit_hessian(model, data)) <= 1e-10


def test_a_no_grad_region_on_values_of_the_parameters_takes_the_generic_path():
    """The scale computed under no_grad from the activations is a constant to autograd: differentiated
    through (the decomposed graph does not say it is one), the products were off by 180 %."""
    torch.manual_seed(0)
    model = Residual(no_grad="activations").double()
    data = feature_batches()
    V = vectors(model)
    result = hessgap.hvp(model, data, V, return_info=True)
    assert result.path == "generic" and "torch.no_grad()" in result.fallback_reason
    assert rel_err(result.value, V @ explicit_hessian(model, data)) <= 1e-10


def test_a_single_batch_is_captured_with_its_sizes_and_another_shape_then_dynamically(captures):
    """A single batch needs no other sizes (a static export costs a third of a dynamic one); the next call
    with another shape gets a capture with dynamic sizes, which serves every shape after it."""
    torch.manual_seed(0)
    model = Residual().double()
    data = feature_batches((6, 3, 5, 4))
    V = vectors(model)
    one = hessgap.hvp(model, data[0], V, return_info=True)
    assert len(captures) == 1 and not captures[0].dynamic and captures[0].static_reason is None
    assert any("the batch's static sizes" in note for note in one.notes) and one.capture_seconds > 0
    assert rel_err(one.value, V @ explicit_hessian(model, data[:1])) <= 1e-10
    hessgap.hvp(model, data[1], V)
    assert len(captures) == 2 and captures[1].dynamic
    for batch in data[2:]:
        assert rel_err(hessgap.hvp(model, batch, V), V @ explicit_hessian(model, [batch])) <= 1e-10
    assert len(captures) == 2


def test_operators_on_the_same_model_share_its_capture(captures):
    torch.manual_seed(0)
    model = Residual().double()
    data = feature_batches()
    V = vectors(model)
    one, other = hessgap.HessianOperator(model, data), hessgap.HessianOperator(model, data[::-1])
    first, second = one.matmat(V), other.matmat(V)
    assert len(captures) == 1
    torch.testing.assert_close(first, second)
    assert one.capture_seconds == pytest.approx(captures[0].seconds) and other.capture_seconds == 0


class Cumulative(nn.Module):
    """A running maximum over the features: an op the graph rules lack (the generic path takes the model)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.cummax(torch.tanh(self.a(x)), dim=1).values)


def test_a_model_the_rules_cannot_run_is_not_captured_again_for_another_shape(captures):
    """The capture of the first batch's shape showed an op without a rule: a batch of another shape took a
    capture with dynamic sizes (for T5, three times the seconds of the static one) only to fail again."""
    torch.manual_seed(0)
    model = Cumulative().double()
    data = feature_batches((6, 3))
    V = vectors(model)
    first = hessgap.hvp(model, data[0], V, return_info=True)
    assert first.path == "generic" and "cummax" in first.fallback_reason and len(captures) == 1
    second = hessgap.hvp(model, data[1], V, return_info=True)
    assert second.path == "generic" and "cummax" in second.fallback_reason
    assert len(captures) == 1
    assert rel_err(second.value, V @ explicit_hessian(model, data[1:])) <= 1e-10
