"""Tiny models the measures' tests share: ReLU nets with and without biases, a BatchNorm MLP, their data."""

import torch
from torch import nn


def classification_data(n=48, features=6, classes=3, seed=0, dtype=torch.float64, batch=16):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=dtype)
    y = (x[:, :2].sum(1) > 0).long() + (x[:, 2] > 0.5).long()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def relu_net(bias=True, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.ReLU(), nn.Linear(8, 5, bias=bias), nn.ReLU(),
                         nn.Linear(5, 3, bias=bias)).to(dtype)


def batchnorm_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    return model


def fit(model, batches, steps=150, lr=0.05):
    """A few ADAM steps, so the measures are taken near a minimum (the loss small but not zero)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()
