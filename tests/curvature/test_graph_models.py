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

from graph_oracles import check_fused_against, check_fused_against_generic, explicit_hessian_of, rel_err

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
