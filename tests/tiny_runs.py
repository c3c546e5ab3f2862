"""Seconds-long training runs and experiment settings shared by the tests of hessgap.train and
hessgap.experiments, and the weight comparisons they check runs with."""

import torch

from hessgap.experiments import Settings
from hessgap.train import TrainConfig, TrainResult


def tiny(**overrides) -> TrainConfig:
    """A narrow F1 on digits for two epochs on the CPU (about a second)."""
    base = dict(model="F1", dataset="digits", width=0.05, depth=0.4, batch_size=128, epochs=2, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def tiny_settings(**changes) -> Settings:
    """Every experiment of the paper at the size of a unit test (F1 at width 0.02, two seeds, 2-3 epochs)."""
    values = dict(model="F1", dataset="digits", width=0.02, epochs=2, lb_epochs=3, sb_batch=64, lb_batch=512,
                  seeds=2, epsilons=(1e-3, 5e-4), subspace_dim=20, eval_batch=2048, alphas=5, spectrum_k=2,
                  sharpness_every=1, trace_probes=4, sweep_batches=(64, 512), warmstart_sb_epochs=2, warmstart_lb_epochs=1,
                  warmstart_every=1, remedies=("augment", "conservative", "adversarial", "dynamic"), device="cpu")
    values.update(changes)
    return Settings(**values)


def load_trained(path, tag) -> TrainResult:
    """The latest checkpoint of the training run ``models/<tag>`` of the run folder ``path``."""
    checkpoints = sorted((path / "models" / tag / "checkpoints").glob("epoch_*.pt"))
    return TrainResult.load(checkpoints[-1])


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_time(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]
