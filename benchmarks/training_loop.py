"""Training-side figures: loader throughput, the cost of each remedy per epoch, and SB vs LB on digits.

    python benchmarks/training_loop.py [--threads 1] [--epochs 20]

Everything is measured side by side in one process, so the ratios hold on a noisy machine.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from torch.utils.data import DataLoader, TensorDataset

from hessgap import sharpness
from hessgap.train import TrainConfig, load_dataset, make_loader, train

import _timing


def best_of(fn, repeats=3):
    return min(_timing.repeat(fn, repeats))


def loader_epoch(loader):
    for _batch in loader:
        pass


def loaders():
    cases = (("50000×3×32×32 (CIFAR-sized)", (50_000, 3, 32, 32), 256), ("1437×1×8×8 (digits)", (1437, 1, 8, 8), 32))
    for label, shape, batch_size in cases:
        data = TensorDataset(torch.randn(*shape), torch.randint(0, 10, (shape[0],)))
        generator = torch.Generator().manual_seed(0)
        ours = best_of(partial(loader_epoch, make_loader(data, batch_size, shuffle=True, seed=0, epoch=1)))
        default = best_of(partial(loader_epoch, DataLoader(data, batch_size=batch_size, shuffle=True,
                                                           generator=generator)))
        print(f"loader, one shuffled epoch of {label} at batch {batch_size}: make_loader {ours * 1e3:.1f} ms, "
              f"DataLoader(batch_size=...) {default * 1e3:.1f} ms, ratio {default / ours:.1f}×")


def remedies(digits, width):
    base = dict(model="C1", dataset="digits", width=width, batch_size=64, epochs=2, device="cpu")
    times = {}
    for remedy in (None, "augment", "conservative", "adversarial"):
        result = train(TrainConfig(**base, remedy=remedy), dataset=digits, progress=False)
        times[remedy] = min(h["seconds"] for h in result.history)
    plain = times[None]
    print(f"remedy cost per epoch (C1 width {width} on digits, batch 64, train + eval): "
          + ", ".join(f"{r or 'plain'} {t:.3f} s ({t / plain:.2f}×)" for r, t in times.items()))


def sb_vs_lb(digits, epochs, width):
    rows = {}
    for label, batch in (("SB", 32), ("LB", 718)):
        result = train(TrainConfig(model="F1", dataset="digits", width=width, batch_size=batch, epochs=epochs,
                                   device="cpu"), dataset=digits, progress=False)
        rows[label] = result.final
    for label, final in rows.items():
        print(f"{label}: train acc {100 * final['train_acc']:.2f} %, test acc {100 * final['test_acc']:.2f} %, "
              f"train loss {final['train_loss']:.2e}, ‖x − x0‖ {final['distance_from_start']:.2f}")
    ratio = rows["SB"]["distance_from_start"] / rows["LB"]["distance_from_start"]
    print(f"‖x_SB − x0‖ / ‖x_LB − x0‖ = {ratio:.2f} (paper: 3–10)")


def sb_vs_lb_sharpness(epochs):
    """F1 width 0.5, SB = 32 vs LB = half the training set, then Metric 2.1 (ε = 1e-3, full space, default solver)."""
    for name in ("digits", "mnist1d"):
        data = load_dataset(name)
        rows = {}
        for label, batch in (("SB", 32), ("LB", data.num_train // 2)):
            result = train(TrainConfig(model="F1", dataset=name, width=0.5, batch_size=batch, epochs=epochs,
                                       device="cpu"), dataset=data, progress=False)
            value = sharpness(result.model, make_loader(data.train, 512, shuffle=False), epsilon=1e-3).value
            rows[label] = (batch, result.final, value)
        for label, (batch, final, value) in rows.items():
            print(f"{name} {label} (batch {batch}, {epochs} epochs): train acc {100 * final['train_acc']:.2f} %, "
                  f"test acc {100 * final['test_acc']:.2f} %, train loss {final['train_loss']:.2e}, "
                  f"‖x − x0‖ {final['distance_from_start']:.2f}, sharpness {value:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--gap-epochs", type=int, default=0, help="also run SB vs LB with sharpness for this many epochs")
    parser.add_argument("--loaders-only", action="store_true")
    args = parser.parse_args()
    _timing.set_threads(args.threads)
    digits = load_dataset("digits")
    loaders()
    if args.loaders_only:
        return
    remedies(digits, width=0.25)
    sb_vs_lb(digits, args.epochs, width=0.5)
    if args.gap_epochs:
        sb_vs_lb_sharpness(args.gap_epochs)


if __name__ == "__main__":
    main()
