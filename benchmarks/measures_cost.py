"""The time each measure of hessgap.measures takes on one F1 network, and how it grows with the network.

Trains an F1 network briefly on MNIST-1D (or digits) at each width, then times every measure over the
first N training samples (without the invariance check, which repeats each measure twice), one line per
measure and width. With ``--device cuda`` the same on a GPU.

    python benchmarks/measures_cost.py                              # widths 0.25, 0.5, 1; 2048 samples
    python benchmarks/measures_cost.py --widths 1,2 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from torch.utils.data import TensorDataset

import hessgap
from hessgap.train import TrainConfig, train
from hessgap.train.data import load_dataset, make_loader

import _timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="0.25,0.5,1", help="F1 width scales, comma-separated")
    parser.add_argument("--depth", type=float, default=0.4, help="F1 depth scale (0.4: two hidden layers)")
    parser.add_argument("--dataset", default="mnist1d", choices=("mnist1d", "digits"))
    parser.add_argument("--samples", type=int, default=2048, help="training samples measured over")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs before measuring")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    _timing.set_threads(args.threads)
    data = load_dataset(args.dataset)
    subset = TensorDataset(*(t[:args.samples] for t in data.train.tensors))
    loader = make_loader(subset, batch_size=1024, shuffle=False)
    rows = []
    for width in (float(w) for w in args.widths.split(",")):
        config = TrainConfig(model="F1", dataset=args.dataset, batch_size=128, epochs=args.epochs, width=width,
                             depth=args.depth, device=args.device)
        model = train(config, progress=False).model
        result = hessgap.measures(model, loader, check_invariance=False)
        for name, seconds in result.seconds.items():
            rows.append({"width": width, "parameters": result.num_parameters, "measure": name, "seconds": seconds})
            print(f"width {width:g} (n = {result.num_parameters}): {name:24s} {seconds:8.3f} s")
        print(f"width {width:g}: all {result.total_seconds:.2f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": f"{platform.machine()} {platform.system()}", "device": args.device,
                       "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
