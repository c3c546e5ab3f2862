"""params=: the Hessian restricted to some parameters is that block of the explicit Hessian, on every call."""

import warnings

import pytest
import torch
from torch import nn

import hessgap
from hessgap.curvature.params import parameter_blocks, select_parameters
from hessgap.errors import HessgapError

from oracles import assert_unchanged, explicit_hessian, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """body (Linear, Tanh, Linear) and head; the head's weight is also reachable as ``tied.weight``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.body(x))))


def net():
    torch.manual_seed(0)
    return Net().double()


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for n in (6, 3)]


def positions(model, names):
    """Coordinates of the named parameters in the full flat vector."""
    out, start = [], 0
    for name, p in model.named_parameters():
        if name in names:
            out.extend(range(start, start + p.numel()))
        start += p.numel()
    return torch.tensor(out)


SELECTIONS = {
    "parameter names": (lambda m: ["head.bias", "body.0.weight"], ["body.0.weight", "head.bias"]),
    "module name": (lambda m: "body.2", ["body.2.weight", "body.2.bias"]),
    "tensors": (lambda m: [m.head.weight, m.norm.bias], ["norm.bias", "head.weight"]),
    "modules": (lambda m: [m.norm, m.body[0]], ["body.0.weight", "body.0.bias", "norm.weight", "norm.bias"]),
    "a mix": (lambda m: [m.head, "body.0.bias", m.norm.weight], ["body.0.bias", "norm.weight", "head.weight", "head.bias"]),
}


@pytest.mark.parametrize("kind", list(SELECTIONS))
def test_the_restricted_hessian_is_the_block_of_the_explicit_one(kind):
    model = net()
    data = batches()
    spec, names = SELECTIONS[kind]
    full = explicit_hessian(model, data)
    index = positions(model, names)
    block = full[index][:, index]
    # the oracle's own restriction agrees with the block of the full Hessian
    torch.testing.assert_close(explicit_hessian(model, data, params=names), block, rtol=1e-10, atol=1e-12)

    selected, _ = select_parameters(model, spec(model))
    assert selected == names  # named_parameters() order, whatever order params= gave
    V = torch.randn(3, len(index), dtype=torch.float64)
    for path in ("auto", "generic"):
        result = hessgap.hvp(model, data, V, params=spec(model), path=path)
        torch.testing.assert_close(result, V @ block, rtol=1e-10, atol=1e-12)
    op = hessgap.HessianOperator(model, data, params=spec(model))
    assert op.n == len(index) and op.names == names
    torch.testing.assert_close(op.matmat(V), V @ block, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", [["2.bias", "0.weight"], "2", lambda m: [m[1]], lambda m: m[2].weight])
def test_the_fused_path_holds_the_parameters_left_out_fixed(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().eval()
    data = batches()
    spec = spec(model) if callable(spec) else spec
    names, _ = select_parameters(model, spec)
    index = positions(model, names)
    block = explicit_hessian(model, data)[index][:, index]
    V = torch.randn(2, len(index), dtype=torch.float64)
    result = hessgap.hvp(model, data, V, params=spec, path="fused", return_info=True)
    assert result.path == "fused"
    torch.testing.assert_close(result.value, V @ block, rtol=1e-10, atol=1e-12)


def test_every_call_takes_params():
    model = net()
    data = batches()
    names = ["body.2.weight", "body.2.bias", "norm.weight"]
    index = positions(model, names)
    block = explicit_hessian(model, data)[index][:, index]
    exact = torch.linalg.eigvalsh(block)
    before = snapshot(model)

    top = hessgap.eigenvalues(model, data, k=2, params=names, tol=1e-8)
    assert top.n == len(index) and top.converged
    assert top.eigenvalues == pytest.approx(exact.flip(0)[:2].tolist(), rel=1e-7, abs=1e-9)
    tr = hessgap.trace(model, data, params=names, num_probes=64)
    assert abs(tr.value - float(block.trace())) < 4 * tr.stderr
    dens = hessgap.density(model, data, params=names, lanczos_steps=len(index), num_probes=1)
    assert dens.n == len(index)
    # n Lanczos steps end on the probe's invariant subspace: every node is an eigenvalue of the block
    distance = (torch.tensor(dens.nodes[0], dtype=torch.float64)[:, None] - exact[None, :]).abs().min(dim=1).values
    assert float(distance.max()) < 1e-8
    sharp = hessgap.sharpness(model, data, params=names)
    assert sharp.num_parameters == len(index)
    assert_unchanged(model, before)


def test_sharpness_moves_only_the_selected_parameters():
    model = net()
    data = batches()
    moved = []

    def watch(model_, batch):
        moved.append([p.detach().clone() for p in model_.parameters()])
        return nn.functional.cross_entropy(model_(batch[0]), batch[1])

    hessgap.sharpness(model, data, params="head", compute_loss=watch, max_iter=2)
    first = moved[0]
    changed = {name for later in moved[1:] for (name, _), a, b in zip(model.named_parameters(), first, later)
               if not torch.equal(a, b)}
    assert changed == {"head.weight", "head.bias"}


def test_a_module_selects_only_its_trainable_parameters():
    model = net()
    model.norm.bias.requires_grad_(False)
    names, _ = select_parameters(model, ["norm", "head.bias"])
    assert names == ["norm.weight", "head.bias"]
    # a frozen parameter named itself, or a module with nothing trainable, is refused
    with pytest.raises(HessgapError, match=r"frozen parameters \(norm.bias"):
        select_parameters(model, "norm.bias")
    with pytest.raises(HessgapError, match=r"frozen parameters \(norm.bias"):
        select_parameters(model, [model.norm.bias])
    model.norm.weight.requires_grad_(False)
    with pytest.raises(HessgapError, match="module 'norm', which has no trainable parameters"):
        select_parameters(model, "norm")
    with pytest.raises(HessgapError, match="module a LayerNorm, which has no trainable parameters"):
        select_parameters(model, model.norm)


def test_a_tied_parameter_is_found_by_every_name_it_has():
    model = net()
    model.tied = nn.Linear(4, 3).double()
    model.tied.weight = model.head.weight  # the same tensor under two names, as a tied LM head
    assert "tied.weight" not in dict(model.named_parameters())
    assert select_parameters(model, "tied.weight")[0] == ["head.weight"]
    assert select_parameters(model, model.tied)[0] == ["head.weight", "tied.bias"]
    assert parameter_blocks(model, select_parameters(model)[0], {"lm head": "tied.weight"}) == {"lm head": [6]}


@pytest.mark.parametrize("params, message", [
    ([], "params= is empty"),
    ("body.1", r"'body.1', which is neither a parameter nor a module with parameters"),
    ("body.0.wieght", r"did you mean body.0.weight"),
    ("haed", r"did you mean head"),
    (lambda m: m.head.weight.detach().clone(), r"tensor of shape \(3, 4\) that is not a parameter of this model"),
    (lambda m: nn.Linear(4, 3), "Linear that is not a submodule with parameters of this model"),
    (lambda m: nn.Tanh(), "Tanh that is not a submodule with parameters of this model"),
    (3, "params= is a int"),
    ([3], "params= holds a int"),
])
def test_bad_params_are_named(params, message):
    model = net()
    spec = params(model) if callable(params) else params
    with pytest.raises(HessgapError, match=message):
        hessgap.hvp(model, batches(), torch.zeros(1, 3), params=spec)
    with pytest.raises(HessgapError, match=message):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hessgap.eigenvalues(model, batches(), params=spec)


def test_vectors_must_fit_the_selection():
    model = net()
    with pytest.raises(HessgapError, match="n = 15 trainable parameters"):
        hessgap.hvp(model, batches(), torch.zeros(1, 12), params="head")
