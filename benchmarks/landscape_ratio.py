"""hessgap.landscape side by side with the per-point methods, on the same model, data and grid.

For each network (F1 on 784 features, C1 on 3×32×32 images, the paper's sizes, after 20 Adam steps from a
seeded initialization; random labels) over --samples. ``--data tensors`` (default) holds Gaussian inputs in
memory; ``--data images`` holds uint8 images and converts each sample as torchvision's ToTensor + Normalize do
(flattened for F1), the data path of loss-landscape's CIFAR-10 and MNIST loaders:

1. hessgap: ``hessgap.landscape(model, loader, steps=21)``, a filter-normalized random plane, one pass over a
   DataLoader of --eval-batch samples.
2. Li et al.'s method (tomgoldstein/loss-landscape, ``plot_surface.py``): for each grid point set the weights
   (``net_plotter.set_weights``: p.data = w + d1·a + d2·b) and run ``evaluation.eval_loss`` over a DataLoader of
   the data with batch 128 (loss and accuracy), along hessgap's directions. Reproduced here (that repository
   is not a package); ``--baseline-points`` times an evenly spread subset and scales to the grid.
3. The ``loss-landscapes`` package: ``random_plane(model, Loss(CrossEntropyLoss(), X, y), steps=21,
   normalization='filter', deepcopy_model=True)`` with the data as one batch. Its directions are replayed from
   the same seed, and hessgap evaluates its grid along them (its even rows are offset by one step in the second
   direction; the comparison follows that). ``--package-steps`` runs it on a smaller grid and scales its time
   per point to the full grid (its cost per point does not depend on the grid).

Values must agree to 1e-5 relative. The script prints a table, the FLOPs of the grid and what the exact algebra of
hessgap's layer-stack engine saves of them, and with --profile the top operators of each method.

    python benchmarks/landscape_ratio.py --models F1,C1 --threads 1

On a GPU, the issue's ResNet-56 target (a 51×51 surface over CIFAR-10's 50000 training images; random images
here, the time does not depend on them; loss-landscapes only runs on the CPU):

    python benchmarks/landscape_ratio.py --models R56 --device cuda --samples 50000 --steps 51 \
        --eval-batch 2500 --baseline-points 3 --skip-package
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import hessgap.landscape
from hessgap.train import build_model

import _timing

SHAPES = {"F1": (784,), "C1": (3, 32, 32), "R56": (3, 32, 32)}
IMAGES = {"F1": (28, 28), "C1": (32, 32, 3), "R56": (32, 32, 3)}


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet56(nn.Module):
    """He et al.'s CIFAR ResNet-56 (3 stages of 9 basic blocks, 16/32/64 channels), as loss-landscape's resnet56."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, channels = [], 16
        for outputs, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(9):
                blocks.append(BasicBlock(channels, outputs, stride if index == 0 else 1))
                channels = outputs
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        features = nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1)
        return self.head(torch.flatten(features, 1))


class Images(Dataset):
    """uint8 images converted sample by sample: ToTensor (HWC uint8 -> CHW float in [0, 1]) and Normalize."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flatten: bool):
        self.images, self.labels, self.flatten = images, labels, flatten

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].float().div(255)
        image = image.permute(2, 0, 1) if image.dim() == 3 else image.unsqueeze(0)
        image = (image - 0.5) / 0.25
        return (image.reshape(-1) if self.flatten else image), self.labels[index]


def dataset(name: str, samples: int, kind: str, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    if kind == "tensors":
        return TensorDataset(torch.randn(samples, *SHAPES[name], generator=generator), labels)
    images = torch.randint(0, 256, (samples, *IMAGES[name]), generator=generator, dtype=torch.uint8)
    return Images(images, labels, flatten=name == "F1")


def setup(name: str, samples: int, kind: str, seed: int, device: torch.device):
    """The network after 20 Adam steps on the data (no parameter is left at its initial zero: loss-landscapes'
    filter normalization divides by zero on an all-zero tensor such as a fresh BatchNorm bias; the BatchNorm
    statistics are the data's), the data set, and all its samples as two tensors."""
    torch.manual_seed(seed)
    model = (ResNet56() if name == "R56" else build_model(name, SHAPES[name], 10)).to(device)
    data = dataset(name, samples, kind, seed)
    inputs, labels = next(iter(DataLoader(data, batch_size=samples)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(20):
        start = (step * 256) % samples
        batch = inputs[start : start + 256].to(device), labels[start : start + 256].to(device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
    return model.eval(), data, inputs, labels


def macs_per_sample(model: nn.Module, shape) -> tuple[int, int]:
    """(multiply-adds of one forward pass per sample, those of the first layer with weights)."""
    counts = []

    def hook(module, args, output):
        if isinstance(module, nn.Linear):
            counts.append(module.in_features * module.out_features)
        elif isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            counts.append(per_output * output[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    for handle in handles:
        handle.remove()
    return sum(counts), counts[0]


# -- Li et al.'s per-point method (tomgoldstein/loss-landscape) ----------------------------------------------
def eval_loss(net, criterion, loader, device):
    """evaluation.eval_loss of loss-landscape: mean loss and accuracy (percent) over the loader."""
    correct, total_loss, total = 0, 0.0, 0
    net.eval()
    with torch.no_grad():
        for inputs, targets in loader:
            batch_size = inputs.size(0)
            total += batch_size
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = net(inputs)
            loss = criterion(outputs, targets)
            total_loss += loss.item() * batch_size
            _, predicted = outputs.max(1)
            correct += predicted.eq(targets).sum().item()
    return total_loss / total, 100.0 * correct / total


def per_point_loop(model, directions, points, loader, device):
    """plot_surface.crunch: for each point set the weights (net_plotter.set_weights) and evaluate."""
    net = copy.deepcopy(model)
    weights = [p.data.clone() for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    dx = [d.view_as(w) for d, w in zip(torch.split(directions[0], sizes), weights)]
    dy = [d.view_as(w) for d, w in zip(torch.split(directions[1], sizes), weights)]
    criterion = nn.CrossEntropyLoss()
    losses, accuracies = [], []
    for a, b in points:
        changes = [d0 * a + d1 * b for d0, d1 in zip(dx, dy)]
        for p, w, d in zip(net.parameters(), weights, changes):
            p.data = w + d.type(w.type())
        loss, accuracy = eval_loss(net, criterion, loader, device)
        losses.append(loss)
        accuracies.append(accuracy)
    return np.array(losses), np.array(accuracies)


# -- the loss-landscapes package -----------------------------------------------------------------------------
def package_directions(model, steps: int, distance: float, seed: int):
    """random_plane's two direction steps, replayed with the package's own functions and the same seed."""
    from loss_landscapes.model_interface.model_parameters import orthogonal_to, rand_u_like
    from loss_landscapes.model_interface.model_wrapper import wrap_model

    torch.manual_seed(seed)
    start = wrap_model(copy.deepcopy(model)).get_module_parameters()
    dir_one = rand_u_like(start)
    dir_two = orthogonal_to(dir_one)
    dir_one.filter_normalize_(start)
    dir_two.filter_normalize_(start)
    for d in (dir_one, dir_two):
        d.mul_(((start.model_norm() / distance) / steps) / d.model_norm())
        d.mul_(steps / 2)
        d.truediv_(steps / 2)
    return torch.stack([torch.cat([p.reshape(-1) for p in d.parameters]) for d in (dir_one, dir_two)])


def run_package(model, inputs, labels, steps: int, distance: float, seed: int) -> np.ndarray:
    from loss_landscapes import random_plane
    from loss_landscapes.metrics import Loss

    torch.manual_seed(seed)
    metric = Loss(nn.CrossEntropyLoss(), inputs, labels)
    return random_plane(model, metric, distance=distance, steps=steps, normalization="filter", deepcopy_model=True)


def package_grid_values(ours_loss: np.ndarray, steps: int) -> np.ndarray:
    """hessgap's values at random_plane's points: row i (first direction) has the second direction's steps
    j + 1 when i is even and j when i is odd (the package walks the rows back and forth), in steps from −steps/2."""
    return np.array([[ours_loss[j + (1 if i % 2 == 0 else 0), i] for j in range(steps)] for i in range(steps)])


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def profile_top(fn, rows: int = 8) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def bench(name: str, args) -> dict:
    device = torch.device(args.device)
    model, data, inputs, labels = setup(name, args.samples, args.data, args.seed, device)
    steps = args.steps
    macs, first_layer = macs_per_sample(model, SHAPES[name])
    grid_gflop = 2 * macs * args.samples * steps * steps / 1e9
    out = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "samples": args.samples,
           "grid": f"{steps}x{steps}", "gflop_grid": grid_gflop, "first_layer_share": first_layer / macs}
    ours_loader = DataLoader(data, batch_size=args.eval_batch)
    ours, out["hessgap_s"], out["hessgap_cpu_s"] = _timing.wall_and_process(
        lambda: hessgap.landscape(model, ours_loader, steps=steps, memory_budget=args.memory_budget))
    out["engine"] = ours.engine
    print(f"{name}: hessgap {out['hessgap_s']:.1f} s ({ours.engine} engine, {ours.passes} pass)", flush=True)

    # Li et al.'s per-point loop along hessgap's directions, on all points or an evenly spread subset
    points = [(a, b) for b in ours.y for a in ours.x]
    chosen = np.linspace(0, len(points) - 1, min(args.baseline_points or len(points), len(points))).round().astype(int)
    loader = DataLoader(data, batch_size=args.loader_batch, shuffle=False)
    (loop_loss, loop_acc), elapsed, cpu = _timing.wall_and_process(
        lambda: per_point_loop(model, ours.directions, [points[i] for i in chosen], loader, device))
    out["loop_s"], out["loop_cpu_s"] = elapsed * len(points) / len(chosen), cpu * len(points) / len(chosen)
    out["loop_points_timed"] = len(chosen)
    out["loop_rel_diff"] = relative(ours.loss.reshape(-1)[chosen], loop_loss)
    out["loop_acc_diff"] = float(np.max(np.abs(ours.accuracy.reshape(-1)[chosen] - loop_acc)))
    print(f"{name}: per-point loop {out['loop_s']:.1f} s ({len(chosen)} points timed), "
          f"max rel diff {out['loop_rel_diff']:.2e}", flush=True)

    if not args.skip_package:
        grid = args.package_steps or steps
        theirs, elapsed, cpu = _timing.wall_and_process(lambda: run_package(model, inputs, labels, grid, args.distance, args.seed))
        out["package_s"], out["package_cpu_s"] = elapsed * (steps / grid) ** 2, cpu * (steps / grid) ** 2
        out["package_grid"] = f"{grid}x{grid}"
        flat = package_directions(model, grid, args.distance, args.seed)
        half = grid / 2
        along, out["hessgap_package_grid_s"], _ = _timing.wall_and_process(
            lambda: hessgap.landscape(model, ours_loader, directions=flat, steps=(grid, grid + 1),
                                      span=((-half, grid - 1 - half), (-half, grid - half)),
                                      memory_budget=args.memory_budget))
        out["package_rel_diff"] = relative(package_grid_values(along.loss, grid), theirs)
        print(f"{name}: loss-landscapes {out['package_s']:.1f} s (run on {grid}x{grid}, scaled), hessgap on its "
              f"{grid}x{grid + 1} grid {out['hessgap_package_grid_s']:.1f} s, max rel diff "
              f"{out['package_rel_diff']:.2e}", flush=True)

    # what the layer-stack engine's exact algebra saves: the first layer runs K = 3 times per batch, not G times
    saved = 0 if ours.engine != "stack" else first_layer * (1 - 3 / (steps * steps))
    out["max_ratio_at_equal_flop_rate"] = macs / (macs - saved)
    for key in ("hessgap", "loop", "package"):
        if f"{key}_s" in out:
            work = grid_gflop * (1 - saved / macs) if key == "hessgap" else grid_gflop
            out[f"{key}_gflops"] = work / out[f"{key}_s"]
    if args.profile:
        print(f"-- hessgap, 3x3 grid, top operators\n{profile_top(lambda: hessgap.landscape(model, ours_loader, steps=3))}")
        print(f"-- per-point loop, 2 points\n"
              f"{profile_top(lambda: per_point_loop(model, ours.directions, points[:2], loader, device))}")
    return out


def cell(row: dict, key: str) -> str:
    """A method's seconds (CPU seconds) and its ratio to hessgap's, in wall-clock time (and CPU time)."""
    return (f"{row[f'{key}_s']:.1f} ({row[f'{key}_cpu_s']:.1f}) | {row[f'{key}_s'] / row['hessgap_s']:.2f}x "
            f"({row[f'{key}_cpu_s'] / row['hessgap_cpu_s']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="F1,C1", help="comma-separated: F1, C1, R56 (ResNet-56)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loader-batch", type=int, default=128, help="the per-point loop's DataLoader batch")
    parser.add_argument("--eval-batch", type=int, default=512, help="hessgap's DataLoader batch")
    parser.add_argument("--memory-budget", type=int, default=None)
    parser.add_argument("--baseline-points", type=int, default=None,
                        help="time the per-point loop on this many evenly spread points and scale (default: all)")
    parser.add_argument("--package-steps", type=int, default=None,
                        help="run random_plane on this grid and scale its time per point (default: --steps)")
    parser.add_argument("--distance", type=float, default=1.0, help="random_plane's distance")
    parser.add_argument("--data", choices=("tensors", "images"), default="tensors")
    parser.add_argument("--skip-package", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    _timing.set_threads(args.threads)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name(torch.device(args.device))}"
    rows = [bench(name.strip(), args) for name in args.models.split(",")]
    print(f"\n{machine}; {args.samples} samples ({args.data}); per-point loop batch {args.loader_batch}, hessgap "
          f"batch {args.eval_batch}")
    print("| model | grid | hessgap s (CPU s) | per-point loop s (CPU s) | ratio (by CPU) | loss-landscapes s "
          "(CPU s) | ratio (by CPU) | max rel diff (loop, package) | GFLOP/s (hessgap, loop, package) | "
          "bound at equal FLOP rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        package = cell(r, "package") if "package_s" in r else "- | -"
        print(f"| {r['model']} | {r['grid']} | {r['hessgap_s']:.1f} ({r['hessgap_cpu_s']:.1f}) | {cell(r, 'loop')} | "
              f"{package} | {r['loop_rel_diff']:.1e}, {r.get('package_rel_diff', float('nan')):.1e} | "
              f"{r['hessgap_gflops']:.0f}, {r['loop_gflops']:.0f}, {r.get('package_gflops', float('nan')):.0f} | "
              f"{r['max_ratio_at_equal_flop_rate']:.2f}x |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine, "args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
