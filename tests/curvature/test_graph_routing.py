"""Mixture-of-experts routing on the graph engine (hessgap/curvature/graph/rules/routing.py and
hessgap/curvature/graph/experts.py): the router's selections and the grouped expert product on tiny float64
graphs against the explicit Hessian, and Hugging Face MoE models in each experts implementation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessgap
from hessgap import _extension

from graph_oracles import (
    check_fused_against,
    check_fused_against_generic,
    explicit_hessian_of,
    rel_err,
    without_float32_casts,
)
from oracles import explicit_hessian

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built"),
              pytest.mark.filterwarnings("ignore")]
D64 = torch.float64


def pair(n=6, features=5, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, dtype=D64, generator=gen), torch.randint(0, classes, (n,), generator=gen)


class Selections(nn.Module):
    """A router's top-2 probabilities renormalized, sorted activations, maxima and minima along a dimension."""

    def __init__(self):
        super().__init__()
        self.router, self.a, self.out = nn.Linear(5, 4), nn.Linear(5, 6), nn.Linear(2 + 6 + 2, 3)

    def forward(self, x):
        top, _ = torch.topk(torch.softmax(self.router(x), -1), 2, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        h = torch.tanh(self.a(x))
        ordered, _ = torch.sort(h, dim=-1, descending=True)
        extremes = torch.stack([h.max(-1).values, h.view(-1, 2, 3).min(-1, keepdim=True).values.sum((1, 2))], -1)
        return self.out(torch.cat([weights * h[:, :2], ordered * h, extremes], -1))


def test_topk_sort_max_min_values():
    model = Selections().double().eval()
    batches = [pair(), pair(4, seed=1)]
    check_fused_against(model, batches, explicit_hessian(model, batches))


class TinyExperts(nn.Module):
    """Top-2 routing over 3 experts, tokens sorted by expert and run through grouped products (transformers'
    ``grouped_mm_fallback``, the op its experts are captured as on CPU); ``twin=True`` computes each expert's
    rows with masks and plain matrix products instead (the same function, differentiable twice)."""

    def __init__(self, twin=False):
        super().__init__()
        self.twin = twin
        self.router = nn.Linear(5, 3)
        self.up, self.down = nn.Parameter(0.5 * torch.randn(3, 5, 4)), nn.Parameter(0.5 * torch.randn(3, 4, 3))

    def _grouped(self, x, w, sorted_ids, offsets):
        if not self.twin:
            return torch.ops.transformers.grouped_mm_fallback(x, w, offsets)
        return sum((sorted_ids == e).unsqueeze(-1).to(x.dtype) * (x @ w[e]) for e in range(w.shape[0]))

    def forward(self, x):
        n = x.shape[0]
        weights, ids = torch.topk(torch.softmax(self.router(x), -1), 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        sorted_ids, perm = torch.sort(ids.reshape(-1))
        offsets = torch.cumsum(torch.histc(sorted_ids.to(x.dtype), bins=3, min=0, max=2), 0, dtype=torch.int32)
        h = F.silu(self._grouped(x[perm // 2], self.up, sorted_ids, offsets))
        out = self._grouped(h, self.down, sorted_ids, offsets) * weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.shape[0])
        return out[inverse].view(n, 2, 3).sum(1)


def test_grouped_expert_products():
    pytest.importorskip("transformers.integrations.moe")  # registers transformers::grouped_mm_fallback
    torch.manual_seed(0)
    model = TinyExperts().double().eval()
    twin = TinyExperts(twin=True).double().eval()
    twin.load_state_dict(model.state_dict())
    batches = [pair(), pair(4, seed=1)]

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    hess = explicit_hessian_of(twin, batches, loss, lambda b: b[0].shape[0])
    check_fused_against(model, batches, hess)


def moe_model(kind, implementation=None, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    options = {} if implementation is None else {"experts_implementation": implementation}
    common = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                  vocab_size=30, max_position_embeddings=32, num_experts_per_tok=2, **options)
    torch.manual_seed(0)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **common))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=24, moe_intermediate_size=12, num_experts=4, decoder_sparse_step=1, **common))
    return model.to(dtype).eval()


def token_batches():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 30, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]


@pytest.mark.parametrize("kind,implementation", [("mixtral", "eager"), ("mixtral", "batched_mm"), ("qwen3_moe", "eager")])
def test_hugging_face_experts_are_captured_grouped_and_exact(kind, implementation):
    """The eager loop (data-dependent shapes) and batched_mm are captured through the grouped implementation,
    the same function: in float64 throughout, the fused path equals the generic path running the model's own
    implementation, and the model keeps that implementation."""
    with without_float32_casts():
        model = moe_model(kind, implementation, D64)
        n = sum(p.numel() for p in model.parameters())
        vectors = torch.randn(2, n, dtype=D64, generator=torch.Generator().manual_seed(0))
        fused = hessgap.hvp(model, token_batches(), vectors, path="fused")
        generic = hessgap.hvp(model, token_batches(), vectors, path="generic")
    assert rel_err(fused, generic) <= 1e-10
    assert model.config._experts_implementation == implementation


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_hugging_face_experts_in_float32_match_the_generic_path(kind):
    """The default (grouped) implementation of a float32 model, whose router computes in float32 whatever the
    model's dtype, against the generic path through the eager experts (the same function)."""
    model = moe_model(kind)
    n = sum(p.numel() for p in model.parameters())
    vectors = torch.randn(2, n, generator=torch.Generator().manual_seed(0))
    fused = hessgap.hvp(model, token_batches(), vectors, path="fused")
    model.set_experts_implementation("eager")
    generic = hessgap.hvp(model, token_batches(), vectors, path="generic")
    assert rel_err(fused.double(), generic.double()) <= 1e-5
    check_fused_against_generic(model, token_batches())  # and the eager loop itself, captured grouped
