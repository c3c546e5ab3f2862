"""Second-order autograd through attention and other ops: rerouted where PyTorch has the rules, named where not."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import hessgap
from hessgap.curvature.second_order import ATTENTION_NOTE, COMPILED_NOTE, NORMALIZATION_NOTE
from hessgap.errors import HessgapError

from oracles import assert_unchanged, explicit_hessian, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
F = nn.functional
FLASH = "aten._scaled_dot_product_flash_attention_for_cpu"


class Attention(nn.Module):
    """One attention layer through F.scaled_dot_product_attention, causal or with a padding mask."""

    def __init__(self, causal: bool, width=4, heads=2, classes=3):
        super().__init__()
        self.causal, self.heads = causal, heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, classes)

    def forward(self, x, mask=None):
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(b, t, w).mean(1))


def attention_data(masked: bool):
    gen = torch.Generator().manual_seed(3)
    out = []
    for n, t in ((3, 5), (2, 4)):
        x = torch.randn(n, t, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=gen)
        if masked:
            mask = torch.ones(n, t, dtype=torch.long)
            mask[0, -2:] = 0
            out.append((x, mask, y))
        else:
            out.append((x, y))
    return out


def attention_model(causal):
    torch.manual_seed(0)
    return Attention(causal).double()


class Ops(TorchDispatchMode):
    """The aten ops that ran."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("causal, masked", [(True, False), (False, True)], ids=["causal", "padding-mask"])
def test_attention_runs_on_every_curvature_call_and_the_notes_say_so(causal, masked):
    model = attention_model(causal)
    data = attention_data(masked)
    with Ops() as ops:  # outside a curvature call the model runs PyTorch's fused CPU kernel
        model(*data[0][:-1])
    assert FLASH in ops.seen

    def objective(forward):
        total = sum(F.cross_entropy(forward(*batch[:-1]), batch[-1]) * len(batch[-1]) for batch in data)
        return total / 5

    H = explicit_hessian(model, objective=objective)
    n = H.shape[0]
    V = torch.randn(3, n, dtype=torch.float64)
    before = snapshot(model)
    # the generic path (autograd's double backward) reroutes attention to the math kernels and says so
    generic = {"path": "generic"}
    with Ops() as ops:
        result = hessgap.hvp(model, data, V, return_info=True, **generic)
    assert FLASH not in ops.seen and "aten._safe_softmax" in ops.seen  # the math kernel's softmax
    assert ATTENTION_NOTE in result.notes
    torch.testing.assert_close(result.value, V @ H, rtol=1e-10, atol=1e-12)

    op = hessgap.HessianOperator(model, data, **generic)
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-10, atol=1e-12)
    assert ATTENTION_NOTE in op.notes
    exact = torch.linalg.eigvalsh(H)
    top = hessgap.eigenvalues(model, data, k=2, tol=1e-8, **generic)
    assert top.eigenvalues == pytest.approx(exact.flip(0)[:2].tolist(), rel=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short density's integral
        results = [top, hessgap.trace(model, data, num_probes=8, **generic),
                   hessgap.density(model, data, lanczos_steps=8, **generic),
                   hessgap.block_spectrum(model, data, num_probes=2, **generic)]
    for r in results:
        assert ATTENTION_NOTE in r.notes and ATTENTION_NOTE in r.to_dict()["notes"]
    # the default path takes the graph engine, whose attention R-op needs no reroute
    fused = hessgap.hvp(model, data, V, return_info=True)
    assert fused.path == "fused" and ATTENTION_NOTE not in fused.notes
    torch.testing.assert_close(fused.value, V @ H, rtol=1e-10, atol=1e-12)
    assert_unchanged(model, before)
    # the caller's own kernel choice is back in force after the call
    with Ops() as ops:
        model(*data[0][:-1])
    assert FLASH in ops.seen


def test_sharpness_keeps_the_fast_kernels():
    model = attention_model(True)
    with Ops() as ops:
        hessgap.sharpness(model, attention_data(False), max_iter=2)
    assert FLASH in ops.seen and "aten._safe_softmax" not in ops.seen


def test_a_model_without_attention_gets_no_note():
    model = nn.Sequential(nn.Linear(4, 3))
    result = hessgap.hvp(model, (torch.randn(5, 4), torch.randint(0, 3, (5,))), torch.randn(1, 15),
                         path="generic", return_info=True)
    assert result.notes == []


def test_a_callers_math_only_context_is_kept():
    model = attention_model(True)
    with sdpa_kernel([SDPBackend.MATH]):
        hessgap.hvp(model, attention_data(False), torch.randn(1, 75, dtype=torch.float64))
        with Ops() as ops:
            model(*attention_data(False)[0][:-1])
    assert FLASH not in ops.seen


class DirectFlash(nn.Module):
    """Calls the CPU flash-attention kernel itself: it has a backward but no double backward."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)
        o = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        return self.out(o.squeeze(1).mean(1))


class PairwiseDistance(nn.Module):
    """Logits as distances to learned class centres by torch.cdist: its backward has no derivative either."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.centres = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return -torch.cdist(self.fc(x), self.centres)


@pytest.mark.parametrize("model, op", [
    (DirectFlash, r"scaled_dot_product_flash_attention_for_cpu in the model itself \(DirectFlash\), whose backward "
                  r"\(aten::_scaled_dot_product_flash_attention_for_cpu_backward\) has no derivative"),
    (PairwiseDistance, r"cdist in the model itself \(PairwiseDistance\), whose backward \(_cdist_backward\) has no "
                       r"derivative"),
])
def test_an_op_without_a_second_order_rule_is_named(model, op):
    model = model()
    data = (torch.randn(3, 5, 4) if isinstance(model, DirectFlash) else torch.randn(3, 5, 4)[:, 0],
            torch.randint(0, 3, (3,)))
    n = sum(p.numel() for p in model.parameters())
    before = snapshot(model)
    for call in (lambda: hessgap.hvp(model, data, torch.randn(2, n)),
                 lambda: hessgap.hvp(model, data, torch.randn(2, n), train_mode=True),
                 lambda: hessgap.eigenvalues(model, data),
                 lambda: hessgap.trace(model, data, num_probes=2)):
        with pytest.raises(HessgapError, match=op) as info:
            call()
        assert "no second-order rule" in str(info.value) or "has no derivative" in str(info.value)
        assert "Replace it" in str(info.value)
    assert_unchanged(model, before)
    # first order is fine: sharpness runs
    assert hessgap.sharpness(model, data, max_iter=1).value >= 0


class HardGate(nn.Module):
    """MobileNetV3's pattern: a hard-swish convolution and a squeeze-and-excitation gate through nn.Hardsigmoid."""

    def __init__(self, gate: nn.Module | None = None):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.Hardswish()
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), gate or nn.Hardsigmoid())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.conv(x))
        return self.fc((h * self.se(h)).mean((2, 3)))


class ClampedHardsigmoid(nn.Module):
    """nn.Hardsigmoid's formula written with clamp, as the error message suggests."""

    def forward(self, x):
        return torch.clamp(x / 6 + 0.5, 0, 1)


class Bags(nn.Module):
    """Mean embedding bags of token ids, then a linear head."""

    def __init__(self, bag: nn.Module | None = None):
        super().__init__()
        self.bag = bag or nn.EmbeddingBag(20, 6, mode="mean")
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.bag(ids)))


class MeanEmbedding(nn.Embedding):
    """nn.EmbeddingBag(mode='mean') on fixed-length bags written as an embedding and a mean, as suggested."""

    def forward(self, ids):
        return super().forward(ids).mean(1)


def gated_model(gate=None):
    torch.manual_seed(0)
    return HardGate(gate).double()


def bag_model(bag=None):
    torch.manual_seed(0)
    return Bags(bag).double()


def image_pairs():
    gen = torch.Generator().manual_seed(4)
    return [(torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for n in (4, 3)]


def bag_pairs():
    gen = torch.Generator().manual_seed(4)
    return [(torch.randint(0, 20, (n, 5), generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (4, 3)]


MISSING_RULES = {
    "hardsigmoid": (gated_model, image_pairs, r"the model uses hardsigmoid in module se\.2 \(Hardsigmoid\), whose "
                    r"backward \(aten::hardsigmoid_backward\) has no derivative",
                    r"torch\.clamp\(x / 6 \+ 0\.5, 0, 1\)"),
    "embedding_bag": (bag_model, bag_pairs, r"the model uses embedding_bag in module bag \(EmbeddingBag\), whose "
                      r"backward \(_embedding_bag_backward\) has no derivative", r"nn\.Embedding followed by"),
}


@pytest.mark.parametrize("name", list(MISSING_RULES))
def test_every_curvature_call_names_the_op_its_module_and_what_to_do(name):
    """Was: the raw ATen names, no module, and advice about attention, from every call on MobileNetV3-like and
    EmbeddingBag models. The graph engine has rules for both ops now, so the default path runs; every call on the
    generic path (asked for, or train mode, which the graph engine does not take) still names them."""
    build, data_of, message, remedy = MISSING_RULES[name]
    model, data = build(), data_of()
    n = sum(p.numel() for p in model.parameters())
    assert hessgap.hvp(model, data, torch.randn(2, n, dtype=torch.float64), return_info=True).path == "fused"
    generic = {"path": "generic"}
    calls = {
        "hvp in train mode": lambda: hessgap.hvp(model, data, torch.randn(2, n, dtype=torch.float64), train_mode=True),
        "hvp generic": lambda: hessgap.hvp(model, data, torch.randn(2, n, dtype=torch.float64), **generic),
        "HessianOperator": lambda: hessgap.HessianOperator(model, data, **generic).matvec(torch.ones(n, dtype=torch.float64)),
        "eigenvalues": lambda: hessgap.eigenvalues(model, data, k=1, **generic),
        "trace": lambda: hessgap.trace(model, data, num_probes=2, **generic),
        "density": lambda: hessgap.density(model, data, num_probes=1, lanczos_steps=4, **generic),
        "block_spectrum": lambda: hessgap.block_spectrum(model, data, k=1, num_probes=1, **generic),
    }
    before = snapshot(model)
    for call_name, call in calls.items():
        with pytest.raises(HessgapError, match=message) as info:
            call()
        assert info.match(remedy), call_name
    assert_unchanged(model, before)
    assert hessgap.sharpness(model, data, max_iter=1).value >= 0  # first order needs no second derivative


def test_what_the_message_suggests_gives_the_hessian():
    images, bags = image_pairs(), bag_pairs()
    # the gate written with clamp is the same function, and autograd differentiates it twice
    gated, clamped = gated_model(), gated_model(ClampedHardsigmoid())
    with torch.no_grad():
        assert torch.equal(gated(images[0][0]), clamped(images[0][0]))
    V = torch.randn(2, sum(p.numel() for p in clamped.parameters()), dtype=torch.float64)
    torch.testing.assert_close(hessgap.hvp(clamped, images, V), V @ explicit_hessian(clamped, images), rtol=1e-10,
                               atol=1e-12)
    # the parameters after the gate: their Hessian needs no derivative through it
    block = explicit_hessian(gated, images, params=["fc.weight", "fc.bias"])
    V = torch.randn(2, block.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hessgap.hvp(gated, images, V, params="fc"), V @ block, rtol=1e-10, atol=1e-12)
    # embedding and mean is the mean bag; and the head's block needs no derivative through the bag
    bagged = bag_model()
    unrolled = bag_model(MeanEmbedding(20, 6))
    unrolled.load_state_dict(bagged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bagged(bags[0][0]), unrolled(bags[0][0]), rtol=1e-14, atol=0)
    V = torch.randn(2, sum(p.numel() for p in unrolled.parameters()), dtype=torch.float64)
    torch.testing.assert_close(hessgap.hvp(unrolled, bags, V), V @ explicit_hessian(unrolled, bags), rtol=1e-10,
                               atol=1e-12)
    block = explicit_hessian(bagged, bags, params=["head.weight", "head.bias"])
    V = torch.randn(2, block.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hessgap.hvp(bagged, bags, V, params="head"), V @ block, rtol=1e-10, atol=1e-12)


def test_a_compiled_model_runs_eagerly_with_the_same_numbers():
    """Was: path="generic" raised torch's own "torch.compile with aot_autograd does not currently support double
    backward"."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    in_place = copy.deepcopy(eager)
    in_place.compile(backend="aot_eager")
    data = [(torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (6, 3)]
    n = sum(p.numel() for p in eager.parameters())
    V = torch.randn(3, n, dtype=torch.float64)
    hess = explicit_hessian(eager, data)
    for compiled in (torch.compile(eager, backend="aot_eager"), in_place):
        for path in ("generic", "auto"):
            result = hessgap.hvp(compiled, data, V, path=path, return_info=True)
            assert COMPILED_NOTE in result.notes, path
            if path == "generic":  # the original module's products, bit for bit
                assert torch.equal(result.value, hessgap.hvp(eager, data, V, path="generic"))
            torch.testing.assert_close(result.value, V @ hess, rtol=1e-10, atol=1e-12)
        top = hessgap.eigenvalues(compiled, data, k=2, path="generic", tol=1e-10)
        assert COMPILED_NOTE in top.notes
        torch.testing.assert_close(torch.tensor(top.eigenvalues, dtype=torch.float64),
                                   torch.linalg.eigvalsh(hess).flip(0)[:2], rtol=1e-8, atol=1e-12)
    assert COMPILED_NOTE not in hessgap.hvp(eager, data, V, return_info=True).notes


def test_a_compiled_model_on_a_torch_that_cannot_run_it_eagerly_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch.compiler, "set_stance")  # torch < 2.6
    torch.manual_seed(0)
    compiled = torch.compile(nn.Sequential(nn.Linear(4, 3)).double(), backend="aot_eager")
    data = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    with pytest.raises(HessgapError, match=r"cannot differentiate twice.*model\._orig_mod"):
        hessgap.hvp(compiled, data, torch.randn(1, 15, dtype=torch.float64), path="generic")


class Square(torch.autograd.Function):
    """x², with a backward PyTorch cannot differentiate (marked once-differentiable)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OnceDifferentiable(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.second(Square.apply(self.first(x)))


class PlainSquare(nn.Module):
    """The same layers with x·x in place of Square: what autograd differentiates twice."""

    def __init__(self, model: OnceDifferentiable):
        super().__init__()
        self.first, self.second = model.first, model.second

    def forward(self, x):
        return self.second(self.first(x) ** 2)


def test_a_once_differentiable_function_is_named_not_silently_dropped():
    """Its Hessian terms came back as zeros: PyTorch raises nothing, the graph just ends."""
    model = OnceDifferentiable()
    data = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    for call in (lambda: hessgap.hvp(model, data, torch.randn(2, 35), path="generic"),
                 lambda: hessgap.hvp(model, data, torch.randn(2, 20), params="first", path="generic"),
                 lambda: hessgap.eigenvalues(model, data, path="generic")):
        with pytest.raises(HessgapError, match="uses Square, whose backward is marked @once_differentiable"):
            call()
    # the graph engine differentiates the forward torch.export captured (x·x), not the custom backward: exact
    model64 = OnceDifferentiable().double()
    x64 = torch.randn(6, 4, dtype=torch.float64)
    V = torch.randn(2, 35, dtype=torch.float64)
    result = hessgap.hvp(model64, (x64, data[1]), V, return_info=True)
    assert result.path == "fused"
    H = explicit_hessian(PlainSquare(model64), [(x64, data[1])])
    torch.testing.assert_close(result.value, V @ H, rtol=1e-10, atol=1e-12)
    # the parameters after it never differentiate through it: the block of the second layer is exact
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4)).double()
    model = OnceDifferentiable().double()
    x = plain(torch.randn(6, 4, dtype=torch.float64)).detach()
    data = (x, torch.randint(0, 3, (6,)))
    V = torch.randn(2, 15, dtype=torch.float64)
    H = explicit_hessian(model.second, [(Square.apply(model.first(x)).detach(), data[1])])
    torch.testing.assert_close(hessgap.hvp(model, data, V, params="second", path="generic"), V @ H)


def test_float16_normalization_runs_in_float32_inside_a_curvature_call():
    torch.manual_seed(0)
    # features with a standard deviation below 0.025: float16's 1/σ³ in LayerNorm's double backward overflows
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].bias.zero_()
    data = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    reference = hessgap.hvp(model, data, V := torch.randn(2, 99), return_info=True)  # float32
    half = model.half()
    before = snapshot(half)
    result = hessgap.hvp(half, data, V, return_info=True, path="generic")  # the graph engine's rules: float32 rows
    assert NORMALIZATION_NOTE in result.notes
    assert float((result.value - reference.value).norm() / reference.value.norm()) < 2e-2
    fused = hessgap.hvp(half, data, V, return_info=True)
    assert fused.path == "fused"
    assert float((fused.value - reference.value).norm() / reference.value.norm()) < 2e-2
    assert_unchanged(half, before)
    # bfloat16 has float32's range: nothing rerouted
    bf16 = hessgap.hvp(model.float().bfloat16(), data, V, return_info=True, path="generic")
    assert NORMALIZATION_NOTE not in bf16.notes


class WeightNormed(nn.Module):
    """weight_norm parametrizations along the first dimension (the default), the last and over the whole weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.utils.parametrizations.weight_norm(nn.Linear(4, 5))
        self.b = nn.utils.parametrizations.weight_norm(nn.Linear(5, 5), dim=1)
        self.c = nn.utils.parametrizations.weight_norm(nn.Linear(5, 3), dim=None)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_weight_norm_on_the_generic_path_is_the_formulas_hessian():
    """Was 0.3–1.0 off: PyTorch's double backward of its fused weight-norm kernel disagrees with finite differences
    of its own gradient; the generic path now runs the weight norm as g·v/‖v‖ and says so."""
    torch.manual_seed(0)
    model = WeightNormed().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, dtype=torch.float64, generator=gen), torch.tensor([0, 2, 1, 1, 0, 2]))]
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector):  # the weights computed from (g, v) by the formula, differentiated by plain autograd
        state = dict(zip(names, (piece.view(shape) for piece, shape in zip(vector.split([s.numel() for s in shapes]),
                                                                                shapes))))
        h = data[0][0]
        for layer, dim in (("a", 0), ("b", 1), ("c", None)):
            g, v = state[f"{layer}.parametrizations.weight.original0"], state[f"{layer}.parametrizations.weight.original1"]
            weight = g * v / (v.norm() if dim is None else v.norm(dim=1 - dim, keepdim=True))
            h = F.linear(h, weight, state[f"{layer}.bias"])
            h = torch.tanh(h) if layer != "c" else h
        return F.cross_entropy(h, data[0][1])

    hess = torch.autograd.functional.hessian(loss, flat)
    V = torch.randn(2, flat.numel(), dtype=torch.float64, generator=gen)
    result = hessgap.hvp(model, data, V, path="generic", return_info=True)
    torch.testing.assert_close(result.value, V @ hess, rtol=1e-10, atol=1e-12)
    assert any("weight_norm ran as g·v/‖v‖" in note for note in result.notes)
