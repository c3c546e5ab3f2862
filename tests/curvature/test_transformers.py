"""The models people train: GPT-2, BERT, ViT and a ResNet from transformers (small random configs), and
hessgap's own CIFAR ResNet, on every call, against float64 references.

Each model runs with its default attention (SDPA); the references are plain double backwards in float64
with eager attention (tests/oracles.py), the loss written from the logits and weighted by the counted
tokens. Every call must leave the model bit for bit as it was: parameters, buffers, modes and grads.
"""

import warnings

import pytest
import torch
from torch import nn

import hessgap
from hessgap.curvature.second_order import ATTENTION_NOTE
from hessgap.train.resnet import cifar_resnet

from oracles import (
    assert_unchanged,
    counted_tokens,
    explicit_hessian,
    hf_objective,
    image_batches,
    randomize_batchnorm,
    reference_hvp,
    snapshot,
    tiny_hf,
    token_batches,
)

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
F = nn.functional


def own_resnet():
    torch.manual_seed(0)
    return randomize_batchnorm(cifar_resnet(8, width=2, num_classes=3)).double().eval()


def pair_batches():
    return [(b["pixel_values"].double(), b["labels"]) for b in image_batches()]


def pair_objective(batches):
    def objective(forward):
        return sum(F.cross_entropy(forward(x), y, reduction="sum") for x, y in batches) / sum(len(y) for _, y in batches)
    return objective


# name: (model, data, reference objective, blocks compared with the explicit Hessian, has attention)
MODELS = {
    "gpt2": (lambda: tiny_hf("gpt2"), lambda: token_batches(causal=True),
             lambda data: hf_objective(data, causal=True),
             ["transformer.h.1.ln_2", "transformer.h.0.attn.c_proj", "transformer.ln_f"], True),
    "bert": (lambda: tiny_hf("bert"), lambda: token_batches(causal=False),
             lambda data: hf_objective(data, causal=False),
             ["bert.encoder.layer.0.attention.self.query", "bert.embeddings.LayerNorm"], True),
    "vit": (lambda: tiny_hf("vit"), image_batches, lambda data: hf_objective(data, causal=False),
            ["vit.layernorm", "classifier", "vit.layers.0.attention.o_proj"], True),
    "hf-resnet": (lambda: tiny_hf("resnet"), image_batches, lambda data: hf_objective(data, causal=False),
                  ["classifier.1", "resnet.encoder.stages.1.layers.0.shortcut.normalization"], False),
    "cifar-resnet": (own_resnet, pair_batches, pair_objective, ["fc", "stages.2.0.bn2", "stem.1"], False),
}
#: Hugging Face computes GPT-2's causal-LM loss in float32 (its logits.float()) even for a float64 model.
TOLERANCE = {"gpt2": 1e-6}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def dirty(model):
    """Train mode and some .grad tensors: what a model looks like in the middle of training."""
    model.train()
    for i, p in enumerate(model.parameters()):
        if i % 3 == 0:
            p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_hvp_matches_a_float64_reference(name):
    build, data_of, objective_of, _, attention = MODELS[name]
    model, data = dirty(build()), data_of()
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(4, n, dtype=torch.float64)
    expected = reference_hvp(model, objective_of(data), V)
    before = snapshot(model)
    # the default takes the graph engine; the generic path (autograd's double backward) must agree with it
    for path in ("auto", "generic"):
        result = hessgap.hvp(model, data, V, return_info=True, path=path)
        assert_unchanged(model, before)
        assert result.path == ("fused" if path == "auto" else "generic"), result.fallback_reason
        assert (ATTENTION_NOTE in result.notes) == (attention and path == "generic")
        if name in ("gpt2", "bert"):
            assert result.units == counted_tokens(data, causal=name == "gpt2")
        assert rel(result.value, expected) < TOLERANCE.get(name, 1e-8), path


def test_gpt2_in_float64_with_a_float64_loss_is_exact_and_the_float32_loss_is_noted():
    model, data = tiny_hf("gpt2"), token_batches(causal=True)
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(3, n, dtype=torch.float64)
    expected = reference_hvp(model, hf_objective(data, causal=True), V)
    default = hessgap.hvp(model, data, V, return_info=True, path="generic")
    assert any("loss came out in float32 for a float64 model" in note for note in default.notes)
    graph = hessgap.hvp(model, data, V, return_info=True)  # the graph engine runs the loss as captured
    assert graph.path == "fused" and rel(graph.value, default.value) < 1e-5

    def next_token_loss(logits, labels):
        logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    exact = hessgap.hvp(model, data, V, loss_fn=next_token_loss,
                        weight_fn=lambda batch: batch["labels"][:, 1:].ne(-100).sum(), return_info=True)
    assert not any("loss came out" in note for note in exact.notes)
    assert rel(exact.value, expected) < 1e-8


@pytest.mark.parametrize("name", list(MODELS))
def test_every_call_runs_and_leaves_the_model_as_it_was(name):
    build, data_of, _, _, attention = MODELS[name]
    model, data = dirty(build().float()), data_of()
    if name == "cifar-resnet":
        data = [(x.float(), y) for x, y in data]
    n = sum(p.numel() for p in model.parameters())
    calls = {
        "sharpness": lambda: hessgap.sharpness(model, data, max_iter=2),
        "adaptive_sharpness": lambda: hessgap.adaptive_sharpness(model, data, max_iter=2),
        "hvp": lambda: hessgap.hvp(model, data, torch.randn(2, n), return_info=True),
        "HessianOperator": lambda: hessgap.HessianOperator(model, data).matmat(torch.randn(2, n)),
        "eigenvalues": lambda: hessgap.eigenvalues(model, data, k=2, max_iter=20),
        "trace": lambda: hessgap.trace(model, data, num_probes=4),
        "density": lambda: hessgap.density(model, data, lanczos_steps=6),
        "block_spectrum": lambda: hessgap.block_spectrum(model, data, k=1, max_iter=10, num_probes=2),
    }
    before = snapshot(model)
    for call_name, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short runs: Lanczos and the density's integral may warn
            result = call()
        assert_unchanged(model, before)
        if call_name in ("sharpness", "adaptive_sharpness"):
            assert result.value >= 0
        elif call_name == "HessianOperator":
            assert result.shape == (2, n) and bool(torch.isfinite(result).all())
        else:
            assert result.to_dict()  # JSON-ready
            # the graph engine's attention R-op needs no reroute; a model without attention never gets the note
            assert ATTENTION_NOTE not in result.notes or attention, call_name


@pytest.mark.parametrize("name", list(MODELS))
def test_block_eigenvalues_match_the_explicit_blocks(name):
    build, data_of, objective_of, blocks, _ = MODELS[name]
    model, data = build(), data_of()
    result = hessgap.block_spectrum(model, data, blocks=blocks, k=2, tol=1e-10, num_probes=0)
    assert result.blocks == blocks and result.traces is None
    objective = objective_of(data)
    for block, sizes, values in zip(blocks, result.sizes, result.eigenvalues):
        names = [f"{block}.{p}" for p, _ in dict(model.named_modules())[block].named_parameters()]
        H = explicit_hessian(model, objective=objective, params=names)
        assert H.shape[0] == sizes
        exact = torch.linalg.eigvalsh(H).flip(0)[:2]
        scale = float(exact.abs().max())
        assert max(abs(a - b) for a, b in zip(values, exact.tolist())) < TOLERANCE.get(name, 1e-8) * scale * 10, block
