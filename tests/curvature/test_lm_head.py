"""The fused LM head + cross-entropy in the graph engine: the rewrite finds Hugging Face's causal-LM loss
(GPT-2 with its tied head, Llama; the label shift, the float32 cast) and a hand-written shifted loss; the
products stay exact (float64 GPT-2 against the explicit Hessian, float32 models against the generic path),
also when a small ``max_memory`` splits the tokens and the vocabulary into chunks, which the result reports."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessgap
from hessgap import _extension
from hessgap.curvature.graph.lm_head import lm_head_cross_entropy

from graph_oracles import check_fused_against, check_fused_against_generic, explicit_hessian_of, rel_err

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built"),
              pytest.mark.filterwarnings("ignore")]
aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def gpt2(vocab=50, width=16, dtype=torch.float32):
    config = transformers.GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=vocab, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def llama(vocab=40, dtype=torch.float32):
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def batches(vocab):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 10), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    return [{"input_ids": ids, "labels": labels}, {"input_ids": ids[:2, :7], "labels": labels[:2, :7]}]


def graph_targets(operator):
    programs = list(operator._engine._plan._programs.values())
    assert programs
    return [{n.target for n in p.captured.graph.nodes} for p in programs]


def shifted_token_loss(logits, labels):
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("build", [gpt2, llama])
def test_hugging_face_causal_lm_loss_is_fused_and_matches_generic(build):
    model = build()
    vocab = model.config.vocab_size
    result = check_fused_against_generic(model, batches(vocab), k=3)
    assert result.token_chunks and result.token_chunks["vocab_chunk"] == vocab
    op = hessgap.HessianOperator(model, batches(vocab), path="fused")
    op.matvec(torch.randn(op.n))
    for targets in graph_targets(op):
        assert lm_head_cross_entropy in targets
        assert aten.cross_entropy_loss.default not in targets


def test_tied_float64_gpt2_with_a_shifted_loss_equals_the_explicit_hessian():
    """GPT-2's head is its embedding (one parameter, two uses); the loss slices the logits [:, :-1]."""
    model = gpt2(vocab=11, width=8, dtype=torch.float64)
    assert model.lm_head.weight is model.transformer.wte.weight
    data = batches(11)
    with sdpa_kernel([SDPBackend.MATH]):
        hess = explicit_hessian_of(model, data, lambda m, b: shifted_token_loss(m(**b).logits, b["labels"]),
                                   lambda b: b["input_ids"].shape[0])
    result = check_fused_against(model, data, hess, k=2, loss_fn=shifted_token_loss)
    assert result.token_chunks


def test_small_budget_splits_tokens_and_vocabulary_and_stays_exact():
    model = gpt2(vocab=600, dtype=torch.float64)
    data = batches(600)
    vectors = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    options = dict(path="fused", return_info=True, loss_fn=shifted_token_loss)  # float64 throughout (HF's: float32)
    whole = hessgap.hvp(model, data, vectors, **options)
    small = hessgap.hvp(model, data, vectors, **options, max_memory="40KiB")
    assert whole.token_chunks["vocab_chunk"] == 600
    assert small.token_chunks["vocab_chunk"] < 600 and small.token_chunks["token_chunk"] < 30
    assert rel_err(small.value, whole.value) < 1e-12
    generic = hessgap.hvp(model, data, vectors, path="generic", loss_fn=shifted_token_loss)
    assert rel_err(small.value, generic) < 1e-10


def test_logits_with_another_use_are_not_fused():
    """A loss that reads the logits twice keeps the plain nodes (the rewrite would drop the second use)."""

    def loss_fn(logits, labels):
        return shifted_token_loss(logits, labels) + 1e-3 * (logits * logits).mean()

    model = gpt2()
    op = hessgap.HessianOperator(model, batches(50), path="fused", loss_fn=loss_fn)
    op.matvec(torch.randn(op.n))
    for targets in graph_targets(op):
        assert lm_head_cross_entropy not in targets


def test_model_with_gradient_checkpointing_enabled_is_captured_and_exact():
    """``gradient_checkpointing_enable()`` leaves eval-mode forwards alone: the capture and the products are
    those of the plain model."""
    model = llama()
    model.gradient_checkpointing_enable()
    result = check_fused_against_generic(model, batches(40), k=2)
    assert result.token_chunks
