"""What the tests judge hessgap against, and the tiny models several test files share.

- :func:`explicit_hessian`: the one explicit Hessian of the tests (torch.autograd.functional.hessian in
  float64), which every curvature and spectrum test compares against.
- :func:`snapshot` / :func:`assert_unchanged`: the model-left-as-it-was contract.
- :func:`randomize_batchnorm`: non-trivial BatchNorm statistics and affine parameters.
- :func:`batchnorm_dropout_mlp`, :func:`unequal_batches`: a tiny MLP with BatchNorm and Dropout (modes
  matter) and 23 samples in unequal batches.
- :class:`Separable`, :func:`identity_loss`, :data:`ONE_BATCH`: a "model" whose forward pass is the loss
  itself, so that box maxima have closed forms.
- :func:`trained_mlp`: small BatchNorm MLPs trained with ADAM, cached per configuration (:data:`SB`,
  :data:`LB`, :data:`TINY_LOSS`).

Test files import these with ``from oracles import ...`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.func import functional_call


def explicit_hessian(model: nn.Module, batches, loss_fn=None) -> torch.Tensor:
    """∇²f over the trainable parameters (flattened in ``parameters()`` order), in float64.

    f = Σ_b w_b · loss_fn(model(x_b), y_b) / Σ_b w_b: the mean loss over every unit of the batches, with the
    model in eval mode. A batch's weight w_b is the number of targets its mean averages over: its size, or
    for cross-entropy with an ignore_index the targets that are not ignored. ``loss_fn`` returns a batch's
    mean loss (default cross-entropy). The model is not touched: a float64 copy is differentiated. The
    result is symmetrized (it is symmetric up to rounding).
    """
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()

    def weight(x, y):
        if isinstance(loss_fn, nn.CrossEntropyLoss) and not y.is_floating_point():
            return int((y != loss_fn.ignore_index).sum())
        return x.shape[0]

    model = copy.deepcopy(model).double().eval()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names, params = [name for name, _ in named], [p.detach() for _, p in named]
    sizes = [p.numel() for p in params]
    batches = [tuple(t.double() if t.is_floating_point() else t for t in batch[:2]) for batch in batches]
    total = sum(weight(x, y) for x, y in batches)

    def f(flat):
        state = dict(zip(names, (piece.view_as(p) for piece, p in zip(flat.split(sizes), params))))
        loss = 0
        for x, y in batches:
            if weight(x, y):
                loss = loss + loss_fn(functional_call(model, state, (x,)), y) * weight(x, y)
        return loss / total

    hess = torch.autograd.functional.hessian(f, torch.cat([p.reshape(-1) for p in params]), vectorize=True)
    return (hess + hess.T) / 2


def snapshot(model: nn.Module):
    """The model's state and every module's train/eval mode, to compare with :func:`assert_unchanged`."""
    return copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]


def assert_unchanged(model: nn.Module, snap) -> None:
    state, modes = snap
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == modes


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BatchNorm's terms are really tested."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


def batchnorm_dropout_mlp() -> nn.Sequential:
    """5 → 4 → 3 with BatchNorm and Dropout: train and eval mode give different losses."""
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 3))


def unequal_batches(n=23, batch=8):
    """``n`` random samples of 5 features and 3 classes in batches of ``batch`` (the last one shorter), and
    all of them as one (inputs, targets) pair."""
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)], x, y


# ---- closed-form sharpness ------------------------------------------------------------------------------

#: One dummy batch: the models below ignore their inputs.
ONE_BATCH = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


def identity_loss(outputs, targets):
    """The loss of a model whose forward pass already returns the loss."""
    return outputs


class Separable(nn.Module):
    """loss(w) = Σ a_i w_i² + Σ b_i w_i + c: the forward pass returns the loss itself."""

    def __init__(self, x, a, b, c=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(x, dtype=torch.float64).clone())
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float64))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float64))
        self.c = c

    def forward(self, inputs):
        return (self.a * self.w**2).sum() + (self.b * self.w).sum() + self.c


# ---- trained models -------------------------------------------------------------------------------------

# (batch size, steps, seed, dtype, samples, lr): small-batch, large-batch, and a float64 model at loss ~1e-5
SB = (32, 100, 0, torch.float32, 256, 1e-2)
LB = (256, 200, 1, torch.float32, 256, 1e-2)
TINY_LOSS = (128, 300, 2, torch.float64, 128, 2e-2)


def trained_mlp(batch_size, steps, seed, dtype=torch.float32, samples=256, lr=1e-2):
    """A small BatchNorm MLP trained with ADAM, and its loader (each configuration trains once per test run;
    every call gets its own copy of the model)."""
    model, loader = _train(batch_size, steps, seed, dtype, samples, lr)
    return copy.deepcopy(model), loader


@functools.cache
def _train(batch_size, steps, seed, dtype, samples, lr):
    torch.manual_seed(seed)
    inputs = torch.randn(samples, 12, dtype=dtype)
    targets = (inputs[:, :3].sum(1) > 0).long() + (inputs[:, 3] > 1).long()
    model = nn.Sequential(
        nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    ).to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        start = (step * batch_size) % samples
        xb, yb = inputs[start : start + batch_size], targets[start : start + batch_size]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    loader = [(inputs[i : i + 64], targets[i : i + 64]) for i in range(0, samples, 64)]
    return model, loader
