"""The Fisher–Rao norm against Liang et al.'s identity on bias-free ReLU nets and per-sample gradients."""

import pytest
import torch
from torch import nn

import hessgap

from measure_models import classification_data, fit, relu_net


def _fr(model, data):
    return hessgap.measures(model, data, ["fisher_rao"], check_invariance=False)


def test_bias_free_relu_net_matches_lemma_2_1():
    data = classification_data()
    model = fit(relu_net(bias=False), data)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        f = model(x)
    grad_f = torch.softmax(f, 1) - nn.functional.one_hot(y, 3).double()  # ∂ℓ/∂f of cross-entropy
    L = 2  # hidden layers
    expected = float(((L + 1) ** 2 * (grad_f * f).sum(1) ** 2).mean())
    assert _fr(model, data).values["fisher_rao"] == pytest.approx(expected, rel=1e-9)


def test_with_biases_it_is_the_definition_over_every_parameter():
    data = classification_data()
    model = fit(relu_net(), data)
    total, count = 0.0, 0
    for xb, yb in data:
        for xi, yi in zip(xb, yb):
            model.zero_grad()
            nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
            total += float(sum((p.detach() * p.grad).sum() for p in model.parameters())) ** 2
            count += 1
    assert _fr(model, data).values["fisher_rao"] == pytest.approx(total / count, rel=1e-9)


def _mean_square_of_unit_terms(model, unit_losses):
    """The definition, unit by unit: mean over the units u of ⟨θ, ∇_θ ℓ_u⟩², each ℓ_u's gradient by autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    squares = []
    for loss in unit_losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        squares.append(float(sum((p.detach() * g).sum() for p, g in zip(params, grads) if g is not None)) ** 2)
    return sum(squares) / len(squares), len(squares)


def test_ignored_targets_are_no_units():
    """Was 0.000520 instead of 0.000693 here: a sample whose target is ignored (-100) added a zero term and
    counted in the mean, though hessgap's loss (and so its Fisher) averages over the counted targets only."""
    data = classification_data()
    model = fit(relu_net(), data)
    data = [(x, y.masked_fill(torch.arange(len(y)) % 4 == 1, -100)) for x, y in data]
    losses = [nn.functional.cross_entropy(model(xi[None]), yi[None]) for x, y in data for xi, yi in zip(x, y)
              if yi != -100]
    expected, units = _mean_square_of_unit_terms(model, losses)
    result = _fr(model, data)
    assert result.values["fisher_rao"] == pytest.approx(expected, rel=1e-9)
    assert result.details["fisher_rao"]["units"] == units == 36


def test_a_class_per_position_makes_each_position_a_unit():
    """Cross-entropy over (samples, classes, length) outputs averages over every counted position: each is a
    unit, as in hessgap's loss (was: one term per sample, the sum over its positions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 3, padding=1)).double()
    generator = torch.Generator().manual_seed(1)
    data = []
    for n in (3, 2):
        x = torch.randn(n, 2, 5, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (n, 5), generator=generator)
        y[0, 1:3] = -100
        data.append((x, y))
    losses = [nn.functional.cross_entropy(model(x)[i, :, t][None], y[i, t][None])
              for x, y in data for i in range(len(y)) for t in range(5) if y[i, t] != -100]
    expected, units = _mean_square_of_unit_terms(model, losses)
    result = _fr(model, data)
    assert result.values["fisher_rao"] == pytest.approx(expected, rel=1e-9)
    assert result.details["fisher_rao"]["units"] == units == 21


@pytest.mark.parametrize("kind", ["gpt2", "bert", "t5"])
def test_hugging_face_token_losses_match_a_per_token_float64_reference(kind):
    """Was, for every one of them: torch's NotImplementedError 'Trying to use forward AD with
    _scaled_dot_product_flash_attention_for_cpu'; and behind it the model's own token loss was taken as
    F.cross_entropy(logits (B, T, V), labels (B, T)): the wrong layout, without the causal shift.

    The unit is the counted label token (labels ≠ -100, shifted by one for GPT-2: token t's loss is the
    cross-entropy of the logits at t − 1), as in hessgap's loss; the reference differentiates each token's
    loss by autograd in float64."""
    pytest.importorskip("transformers")
    from oracles import counted_tokens, tiny_hf, token_batches

    causal = kind == "gpt2"
    model = tiny_hf(kind)
    data = token_batches(causal=causal)
    losses = []
    for batch in data:
        logits, labels = model(**batch).logits, batch["labels"]
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        losses += [nn.functional.cross_entropy(logits[i, t][None], labels[i, t][None])
                   for i in range(labels.shape[0]) for t in range(labels.shape[1]) if labels[i, t] != -100]
    expected, units = _mean_square_of_unit_terms(model, losses)
    result = _fr(model, data)
    assert units == counted_tokens(data, causal) == result.details["fisher_rao"]["units"]
    # T5's layer norm takes its variance in float32 even in a float64 model
    assert result.values["fisher_rao"] == pytest.approx(expected, rel=1e-7 if kind == "t5" else 1e-9)
    if kind != "t5":  # T5's attention is its own matmuls; GPT-2's and BERT's run through SDPA
        assert any("scaled_dot_product_attention" in note for note in result.notes["fisher_rao"])


def test_the_example_gpt2_runs_in_float32():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()
    ids = torch.randint(0, 50, (4, 12))
    result = _fr(model, [{"input_ids": ids, "labels": ids}])
    assert result.details["fisher_rao"]["units"] == 4 * 11
    assert result.values["fisher_rao"] > 0


def test_an_own_loss_that_is_no_token_cross_entropy_does_not_apply():
    """A regression head's own loss (MSE of float labels) has no per-unit cross-entropy hessgap could rebuild."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=23, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=12,
                                                     max_position_embeddings=16, num_labels=1)).eval()
    batch = {"input_ids": torch.randint(0, 23, (3, 6)), "labels": torch.randn(3)}
    result = _fr(model, [batch])
    assert result.values["fisher_rao"] is None
    assert "not a cross-entropy of integer labels" in result.not_applicable["fisher_rao"]


def test_an_op_without_a_forward_mode_rule_is_named():
    """Was torch's raw NotImplementedError 'Trying to use forward AD with _embedding_bag ...'."""
    from hessgap.errors import HessgapError

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.fc = nn.EmbeddingBag(10, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.bag(x))

    torch.manual_seed(0)
    data = [(torch.randint(0, 10, (5, 3)), torch.randint(0, 3, (5,)))]
    with pytest.raises(HessgapError, match=r"embedding_bag in module bag \(EmbeddingBag\), which has no forward-mode"):
        _fr(Bags(), data)
