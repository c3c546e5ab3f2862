"""What a hessgap.Tracker record costs inside a training loop, and how warm starts pay off.

Two workloads, each trained with a Tracker (λmax and critical sharpness, plus the edge-of-stability ratio
for SGD) every ``--every`` steps:

    mlp     an MLP (64 → 128 → 128 → 10, tanh) on scikit-learn's digits (1437 samples) with the squared error
            to one-hot targets (as Cohen et al. 2021), full-batch gradient descent (lr ``--lr``, 0.5): a smooth
            run that sharpens progressively towards the edge of stability 2/η
    gpt2    transformers' GPT2LMHeadModel from a small random config (2 layers, width 64, 4 heads,
            vocabulary 256, sequence 64), AdamW (lr 1e-3; ``--optimizer sgd``: SGD without momentum, lr 0.02)
            on synthetic tokens from a sparse Markov chain, batches of 16 sequences, the tracked data 2 held-out
            batches

Per record it prints and writes (``--json``):

    hvps warm / cold    Hessian-vector products of the record's λmax (Lanczos from the previous record's
                        eigenvector) and of a cold hessgap.eigenvalues call at the same weights (random start,
                        at its default tol 1e-3); |Δλ| their relative difference
    λc passes           forward passes of the critical line search (plus one gradient for the update)
    record / gradient   the record's cost over the cost of one gradient (forward + backward) of the tracked
                        data, timed side by side right after it (CPU seconds of this process, one thread:
                        robust to other jobs on a shared machine)
    overhead            the records' cost over the training steps' cost, at the chosen ``every``

and draws λmax and λc against the step (``--png``). Run from the repository root:

    python benchmarks/tracker_cost.py --workload mlp --steps 400 --every 10
    python benchmarks/tracker_cost.py --workload gpt2 --steps 300 --every 10 --png benchmarks/figures/tracker_gpt2.png
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

import hessgap
from hessgap.curvature.objective import LossOverData
from hessgap.tracking.plot import render


def cpu_seconds(function):
    started = time.process_time()
    value = function()
    return value, time.process_time() - started


# -- workloads: (model, optimizer, a function that takes one training step, tracked data, measures) ----------

def mlp_workload(seed: int, lr: float, optimizer_name: str = "sgd"):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = nn.functional.one_hot(torch.tensor(digits.target), 10).float()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step():
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    return model, optimizer, step, [(x, y)], ("lambda_max", "critical_sharpness", "eos_ratio"), nn.functional.mse_loss


def markov_tokens(rows: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences of a Markov chain where each token has 4 likely successors: something to learn."""
    successors = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(1234))
    tokens = torch.empty(rows, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (rows,), generator=generator)
    for t in range(1, length):
        choice = torch.randint(0, 4, (rows,), generator=generator)
        tokens[:, t] = successors[tokens[:, t - 1], choice]
    return tokens


def gpt2_workload(seed: int, lr: float, optimizer_name: str = "adamw"):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed + 1)
    tracked = [{"input_ids": ids, "labels": ids} for ids in markov_tokens(32, 64, 256, generator).split(16)]

    def step():
        ids = markov_tokens(16, 64, 256, generator)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    measures = ("lambda_max", "critical_sharpness") + (("eos_ratio",) if optimizer_name == "sgd" else ())
    return model, optimizer, step, tracked, measures, None


WORKLOADS = {"mlp": mlp_workload, "gpt2": gpt2_workload}
DEFAULT_LR = {("mlp", "sgd"): 0.5, ("gpt2", "adamw"): 1e-3, ("gpt2", "sgd"): 0.02}


def gradient_cost(model, data, loss_fn, rounds: int = 3) -> float:
    """CPU seconds of one forward + backward over the tracked data (fastest of ``rounds``), in eval mode as the
    tracker measures."""
    objective = LossOverData(model, data, loss_fn)
    objective.cache_batches()
    with hessgap.preserved(model, parameters=False):
        return min(cpu_seconds(objective.value_and_grad)[1] for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), help="gpt2's optimizer (default: adamw; mlp: sgd)")
    parser.add_argument("--lr", type=float, help="learning rate (mlp: 0.5, gpt2: 1e-3 for AdamW, 0.02 for SGD)")
    parser.add_argument("--tol", type=float, default=1e-3, help="the tracker's Lanczos tolerance (default: the tracker's, 1e-3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold eigenvalues call at every record")
    parser.add_argument("--json", help="write every record and the summary here")
    parser.add_argument("--png", help="draw the loss, λmax and λc against the step here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    optimizer_name = args.optimizer or ("sgd" if args.workload == "mlp" else "adamw")
    if args.workload == "mlp" and optimizer_name != "sgd":
        parser.error("the mlp workload runs gradient descent (--optimizer sgd)")
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.workload, optimizer_name]
    model, optimizer, step, tracked, measures, loss_fn = WORKLOADS[args.workload](args.seed, lr, optimizer_name)
    tracker = hessgap.Tracker(model, tracked, every=args.every, measures=measures, optimizer=optimizer, loss_fn=loss_fn,
                              tol=args.tol)
    rows, step_seconds, record_seconds = [], [], []
    for number in range(1, args.steps + 1):
        loss, seconds = cpu_seconds(step)
        step_seconds.append(seconds)
        record, seconds = cpu_seconds(lambda: tracker.step(number))  # noqa: B023
        if record is None:
            continue
        record_seconds.append(seconds)
        row = {"step": number, "train_loss": loss, "loss": record["loss"], "lambda_max": record["lambda_max"],
               "critical_sharpness": record["critical_sharpness"], "eos_ratio": record.get("eos_ratio"),
               "lr": record["lr"], "hvps_warm": record["details"]["lambda_max"]["hvps"],
               "critical_passes": record["details"]["critical_sharpness"]["forward_passes"],
               "record_cpu_s": seconds, "gradient_cpu_s": gradient_cost(model, tracked, loss_fn)}
        row["record_in_gradients"] = row["record_cpu_s"] / row["gradient_cpu_s"]
        if not args.no_cold:
            cold = hessgap.eigenvalues(model, tracked, k=1, loss_fn=loss_fn)  # its defaults: tol 1e-3
            row["hvps_cold"] = cold.hvps
            row["cold_lambda_max"] = cold.eigenvalues[0]
            row["relative_difference"] = abs(cold.eigenvalues[0] - record["lambda_max"]) / abs(cold.eigenvalues[0])
        rows.append(row)
        cold_text = (f"cold {row['hvps_cold']:3d} |Δλ| {row['relative_difference']:.1e}  " if not args.no_cold else "")
        lambda_c = row["critical_sharpness"]
        print(f"step {number:5d}  loss {record['loss']:.4f}  λmax {record['lambda_max']:9.4g}  "
              f"λc {lambda_c if lambda_c is None else format(lambda_c, '9.4g')}  hvps warm {row['hvps_warm']:3d} "
              f"{cold_text}λc passes {row['critical_passes']:2d}  record/gradient {row['record_in_gradients']:5.1f}",
              flush=True)

    later = rows[1:]
    summary = {
        "workload": args.workload, "optimizer": optimizer_name, "steps": args.steps, "every": args.every, "lr": lr,
        "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()), "records": len(rows),
        "hvps_first_record": rows[0]["hvps_warm"],
        "hvps_warm_median_after_first": statistics.median(r["hvps_warm"] for r in later),
        "hvps_warm_max_after_first": max(r["hvps_warm"] for r in later),
        "critical_passes_median": statistics.median(r["critical_passes"] for r in later),
        "record_in_gradients_median": statistics.median(r["record_in_gradients"] for r in later),
        "step_cpu_s_median": statistics.median(step_seconds),
        "overhead": sum(record_seconds) / sum(step_seconds),
        "lambda_c_over_lambda_max_median": statistics.median(
            r["critical_sharpness"] / r["lambda_max"] for r in rows if r["critical_sharpness"]),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
    }
    if not args.no_cold:
        summary["hvps_cold_median"] = statistics.median(r["hvps_cold"] for r in rows)
        summary["relative_difference_max"] = max(r["relative_difference"] for r in rows)
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"summary": summary, "records": rows}, handle, indent=1)
    if args.png:
        title = f"{args.workload}, {optimizer_name} (lr {lr:g}): λmax and λc every {args.every} steps"
        with open(args.png, "wb") as handle:
            handle.write(render(tracker.history, title=title))


if __name__ == "__main__":
    main()
