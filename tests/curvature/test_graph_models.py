"""The graph engine on models nobody here wrote (Hugging Face transformers, built from small random configs):
the fused path runs and equals the generic path (float32, relative error ≤ 1e-5), and on a tiny float64
GPT-2 equals the explicit Hessian (≤ 1e-10)."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessgap
from hessgap import _extension

from graph_oracles import (
    check_fused_against,
    check_fused_against_generic,
    explicit_hessian_of,
    rel_err,
    without_float32_casts,
)

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built"),
              pytest.mark.filterwarnings("ignore")]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def gpt2(attn="sdpa", layers=2, width=32, vocab=50, dtype=torch.float32):
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab, n_positions=16,
                                     attn_implementation=attn, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def token_batches(vocab=50, padded=True):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that does not count
    batch = {"input_ids": ids, "labels": labels}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels[1, 9:] = -100
        batch["attention_mask"] = mask
    short = {key: value[:2, :8] for key, value in batch.items()}
    return [batch, short]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_matches_generic(attn):
    result = check_fused_against_generic(gpt2(attn), token_batches())
    assert result.units == pytest.approx(sum(int((b["labels"][:, 1:] != -100).sum()) for b in token_batches()))


def shifted_token_loss(logits, labels):
    """Next-token cross-entropy in the model's dtype (Hugging Face's own loss upcasts logits to float32)."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def test_tiny_gpt2_matches_explicit_hessian():
    model = gpt2("sdpa", layers=1, width=8, vocab=11, dtype=torch.float64)
    batches = token_batches(vocab=11)
    with sdpa_kernel([SDPBackend.MATH]):  # the only attention kernel with a double backward
        hess = explicit_hessian_of(model, batches, lambda m, b: shifted_token_loss(m(**b).logits, b["labels"]),
                                   lambda b: b["input_ids"].shape[0])
    check_fused_against(model, batches, hess, k=2, loss_fn=shifted_token_loss)


def resnet():
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=5)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_resnet_matches_generic():
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(2)]
    check_fused_against_generic(resnet(), batches)


def test_llama_rmsnorm_silu_rotary_grouped_heads_match_generic():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(3))
    check_fused_against_generic(model, [{"input_ids": ids, "labels": ids}])


def test_bert_padding_mask_exact_gelu_matches_generic():
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 30, (3, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    check_fused_against_generic(model, [{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}])


def test_vit_matches_generic():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=24, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    gen = torch.Generator().manual_seed(5)
    check_fused_against_generic(model, [(torch.randn(3, 3, 8, 8, generator=gen), torch.tensor([0, 2, 1]))])


@pytest.mark.cuda
def test_gpt2_on_cuda_matches_generic_on_cpu():
    model = gpt2("sdpa")
    batches = token_batches()
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(3, n, generator=torch.Generator().manual_seed(0))
    want = hessgap.hvp(model, batches, V, path="generic")
    cuda_batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
    got = hessgap.hvp(model.cuda(), cuda_batches, V.cuda(), path="fused").cpu()
    assert rel_err(got.double(), want.double()) <= 1e-5


# ---- the decoder families and the models that fell back before ------------------------------------------------


def check_exact_against_generic(model, batches, k=2):
    """In float64 throughout (the model's float32 casts skipped, see without_float32_casts), the fused path equals
    the generic path to 1e-10; returns the fused result."""
    with without_float32_casts():
        model = model.double().eval()
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        vectors = torch.randn(k, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        fused = hessgap.hvp(model, batches, vectors, path="fused", return_info=True)
        generic = hessgap.hvp(model, batches, vectors, path="generic")
    assert fused.path == "fused"
    assert rel_err(fused.value, generic) <= 1e-10
    return fused


DECODER = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=4, vocab_size=40, max_position_embeddings=32)


def decoder(name, **options):
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**DECODER, **options)
    model_class = getattr(transformers, f"{name.removesuffix('Text')}ForCausalLM")
    return model_class(config).eval()


def padded_tokens(vocab=40):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]


@pytest.mark.parametrize("name,options", [
    ("Gemma", {}),  # RMSNorm computed in float32 and cast back with type_as, scaled embeddings
    ("Gemma2", dict(sliding_window=4, attn_implementation="eager")),  # logit soft-capping needs eager attention
    ("Gemma3Text", dict(sliding_window=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        attn_implementation="eager")),
    ("Gemma3Text", dict(sliding_window=4)),
    ("Qwen3", {}),  # q/k norms
    ("Mistral", dict(sliding_window=4)),
])
def test_decoder_families_are_exact(name, options):
    check_exact_against_generic(decoder(name, **options), padded_tokens())


def test_gemma3_in_float32_matches_generic():
    """Gemma computes its norms in float32 whatever the model's dtype: the float32 model against the generic path."""
    check_fused_against_generic(decoder("Gemma3Text", sliding_window=4), padded_tokens())


def test_llama_with_grouped_query_attention_in_the_kernel_call(monkeypatch):
    """transformers passes enable_gqa=True to scaled_dot_product_attention when it may (no mask, or forced); under
    capture it materializes the mask and repeats K/V itself (repeat_kv), so force it."""
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    check_exact_against_generic(decoder("Llama"), padded_tokens())


def test_llama_whose_attention_output_the_capture_saw_transposed():
    """A float32 capture outside a curvature call records PyTorch's CPU flash-attention layout ((B, T, H, D),
    transposed): the model's .contiguous() after the transpose is then a no-op the graph drops, and the view after
    it must still work on the fused rule's (B, H, T, D) output."""
    from hessgap.curvature.graph.capture import capture

    model = decoder("Llama")
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids}
    capture(model, None, True, ((), dict(batch), None))
    check_fused_against_generic(model, [batch])


def test_t5_relative_position_bias_in_the_mask():
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1,
                                   num_heads=4, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 40, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.randint(2, 40, (2, 5), generator=gen)
    check_exact_against_generic(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}])


def test_swin_relative_position_bias_table():
    config = transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[2, 1], num_heads=[2, 2],
                                     window_size=4, num_labels=3)  # a stage's second block shifts its windows (roll)
    torch.manual_seed(0)
    model = transformers.SwinForImageClassification(config).eval()
    gen = torch.Generator().manual_seed(5)
    check_exact_against_generic(model, [(torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([0, 2]))])
