"""The model zoo's fast subset: tiny configurations of benchmarks/zoo_models.py that need only torch and
transformers, each checked for exactness against a float64 double backward (benchmarks/zoo_check.py) and for
the path hessgap takes.

Where the model computes in float64 throughout, hessgap's HVP must match the reference to 1e-10 relative; models
that cast to float32 inside (Hugging Face's RMSNorm and rotary tables) are held to float32's level against it and
to 1e-5 against hessgap's generic path. Configurations that take the fused path today must keep taking it; those
that fall back are strict xfails naming the missing graph rule, so the rule that makes them fused flips them
(a strict xfail that passes fails the run: then move the configuration to FUSED). The timm configurations need
torchvision and run in benchmarks/zoo.py only.
"""

import warnings

import pytest
import torch

from hessgap import _extension

import zoo_check
import zoo_models

pytest.importorskip("transformers")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")]

#: configurations on the fused path today (the others of the subset below fall back)
FUSED = ["gpt2", "llama", "bert", "vit", "convnext", "cifar-resnet18", "mlp", "compiled-cnn",
         "t5", "swin", "gemma3", "qwen3-moe", "lstm", "gru"]
#: configurations that fall back today, with the op whose graph rule is missing
FALLS_BACK: dict[str, str] = {}
CASES = FUSED + [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"graph rule missing: {op}"))
                 for name, op in FALLS_BACK.items()]


def test_the_zoo_has_every_family_the_benchmark_promises():
    names = set(zoo_models.CONFIGS)
    assert len(names) >= 22
    for family in ("gpt2", "llama", "qwen3", "gemma3", "mistral", "mixtral", "bert", "roberta", "t5", "bart", "vit",
                   "swin", "convnext", "timm-resnet18", "timm-efficientnet_b0", "timm-mobilenetv3_small",
                   "timm-mobilenetv3_large", "timm-convnext_atto", "timm-vit_tiny", "lstm", "gru", "compiled-cnn"):
        assert family in names
    assert set(FUSED) | set(FALLS_BACK) <= names


@pytest.mark.parametrize("name", CASES)
def test_tiny_config_is_exact_and_fused(name, record_property):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = zoo_models.build(name, "tiny")
        result = zoo_check.check(case)
    record_property("path", result["path"])
    record_property("fallback_reason", result["fallback_reason"])
    record_property("computes_in", result["computes_in"])
    # exact on every path, the generic one included
    assert result["exact"], result
    if result["computes_in"] == "float64":
        assert result["error_reference"] <= 1e-10
    assert result["path"] == "fused", result["fallback_reason"]


def test_ragged_token_batches_pad_with_masks_and_ignored_targets():
    case = zoo_models.build("gpt2", "tiny")
    (ids, mask, targets), (short_ids, _, _) = case.loader
    assert ids.shape != short_ids.shape
    assert (mask == 0).any()
    # padded positions never count: the shifted targets are -100 wherever the next token is padding
    assert (targets[mask[:, 1:] == 0] == -100).all()
    assert zoo_models.units(case.loader[0]) == int((mask[:, 1:] == 1).sum())


def test_float64_check_catches_a_wrong_product(monkeypatch):
    """The check is not vacuous: a product off by 1e-8 relative fails the float64 tolerance."""
    import hessgap

    case = zoo_models.build("mlp", "tiny")
    honest = hessgap.HessianOperator.matmat
    monkeypatch.setattr(hessgap.HessianOperator, "matmat", lambda self, V: honest(self, V) * (1 + 1e-8))
    result = zoo_check.check(case)
    assert result["computes_in"] == "float64"
    assert not result["exact"] and 5e-9 < result["error_reference"] < 2e-8


def test_casts_to_float32_inside_are_found():
    case = zoo_models.build("llama", "tiny").double()
    assert "_to_copy" in zoo_check.low_precision_ops(case.eager, case.loader[0])
    plain = zoo_models.build("mlp", "tiny").double()
    assert zoo_check.low_precision_ops(plain.eager, plain.loader[0]) == []


class _HardGate(torch.nn.Module):
    """Linear → hardswish, gated by hardsigmoid (MobileNetV3's squeeze-excite), → Linear; plain ops if asked."""

    def __init__(self, plain: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.gate, self.out = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)
        self.plain = plain

    def forward(self, x):
        h = self.inp(x)
        if self.plain:
            h = h * torch.clamp(h + 3, 0, 6) / 6
            return self.out(h * torch.clamp(self.gate(h) + 3, 0, 6) / 6)
        h = torch.nn.functional.hardswish(h)
        return self.out(h * torch.nn.Hardsigmoid()(self.gate(h)))


def test_reference_of_hard_activations_is_the_plain_ops_hessian():
    """PyTorch has no double backward of hardswish/hardsigmoid; the reference's is that of their plain-op form."""
    gen = torch.Generator().manual_seed(1)
    loader = [(torch.randn(8, 4, generator=gen, dtype=torch.float64) * 3, torch.randint(0, 3, (8,), generator=gen))]
    hard, plain = _HardGate(False).double(), _HardGate(True).double()
    n = sum(p.numel() for p in hard.parameters())
    V = torch.randn(2, n, generator=gen, dtype=torch.float64)
    loss = torch.nn.functional.cross_entropy
    reference = zoo_check.reference_hvp(hard, loader, loss, V)
    assert zoo_check.rel_err(reference, zoo_check.reference_hvp(plain, loader, loss, V)) <= 1e-14
    with pytest.raises(RuntimeError, match="not implemented"):  # outside the block: PyTorch's own kernels
        torch.autograd.grad(torch.autograd.grad(loss(hard(loader[0][0]), loader[0][1]), list(hard.parameters()),
                                                create_graph=True)[0].sum(), list(hard.parameters()))
