"""Experiment 5, Figure 5: large-batch training warm-started from small-batch iterates ("piggybacking").

SB trains for ``warmstart_sb_epochs`` epochs; its checkpoint after every epoch is kept. From the iterate
after epoch e (every ``warmstart_every`` epochs, and e = 0, the common start), LB trains for
``warmstart_lb_epochs`` epochs (fixed epochs also with ``stop="plateau"``, as the paper's 100 + 100). The
paper started from the iterate after every epoch (``warmstart_every=1``, the paper preset): 101 LB runs. The paper: early warm starts end sharp, later ones flat and as accurate as SB.
"""

from __future__ import annotations

from pathlib import Path

from ..train.checkpoint import load_epoch_state
from . import _figures as draw
from . import _markdown as md
from . import networks
from .paper import FIGURE_NOTES
from .presets import Settings
from .runs import RunFolder

NAME = "warmstart"


def warm_epochs(settings: Settings) -> list[int]:
    """The SB epochs to warm-start from: 0 (no SB at all), every ``warmstart_every``, and the last."""
    epochs = list(range(0, settings.warmstart_sb_epochs + 1, settings.warmstart_every))
    if epochs[-1] != settings.warmstart_sb_epochs:
        epochs.append(settings.warmstart_sb_epochs)
    return epochs


def run(folder: RunFolder, settings: Settings) -> dict:
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    data = networks.dataset(settings)
    lb = settings.lb_size(len(data.train))
    networks.check_batch(lb, len(data.train), "LB batch size")
    seed = settings.seed
    sb_config = networks.train_config(
        settings, settings.sb_batch, seed, epochs=settings.warmstart_sb_epochs, keep_checkpoints=None, fixed_epochs=True
    )
    sb = networks.train(folder, sb_config, f"warm-sb-seed{seed}", data)
    rows = []
    for epoch in warm_epochs(settings):
        lb_config = networks.train_config(settings, lb, seed, epochs=settings.warmstart_lb_epochs, fixed_epochs=True)
        if sb.diverged is not None and epoch >= sb.diverged:
            rows.append({"warm_epoch": epoch, "diverged": None, "skipped": f"SB diverged at epoch {sb.diverged}"})
            continue
        if epoch > len(sb.history):  # --patience stopped the SB run before this epoch
            rows.append({"warm_epoch": epoch, "diverged": None,
                         "skipped": f"SB stopped at epoch {len(sb.history)} (its loss no longer improved)"})
            continue
        if epoch == 0:  # the common start: plain LB training from the seed's initial weights
            trained = networks.train(folder, lb_config, f"warm-lb-from0-seed{seed}", data)
        else:
            state = load_epoch_state(sb.out_dir, epoch)
            trained = networks.train(folder, lb_config, f"warm-lb-from{epoch}-seed{seed}", data, init_state=state,
                                     init_label=f"{sb.tag}/epoch{epoch}")
        row = {"warm_epoch": epoch, "model": trained.tag, "diverged": trained.diverged, "sharpness": {}}
        if trained.diverged is None:
            row.update(networks.final_metrics(trained))
            for eps in settings.epsilons:
                row["sharpness"][f"{eps:g}"] = networks.sharpness(folder, trained, settings, eps, seed=seed)["value"]
        rows.append(row)
    sb_eval = networks.final_metrics(sb) if sb.diverged is None else None
    result = {
        "experiment": NAME,
        "settings": settings.to_dict(),
        "epsilons": list(settings.epsilons),
        "lb_batch": lb,
        "sb_model": sb.tag,
        "sb_final": sb_eval,
        "rows": rows,
        "paper": FIGURE_NOTES["warmstart"],
    }
    result["figures"] = {"warmstart": plot(result, folder.figure("warmstart")).name}
    folder.save_result(NAME, result)
    return result


# --- its report section and figure --------------------------------------------------------------------

def render(r: dict) -> str:
    eps = r["epsilons"]
    rows = []
    for row in r["rows"]:
        if row.get("skipped") or row.get("diverged") is not None:
            rows.append([row["warm_epoch"], row.get("skipped") or f"diverged at epoch {row['diverged']}", "–"] + ["–"] * len(eps))
        else:
            rows.append([row["warm_epoch"], md.pct(row["train_acc"]), md.pct(row["test_acc"])]
                        + [md.fmt(row["sharpness"].get(f"{e:g}")) for e in eps])
    sb = r.get("sb_final") or {}
    return "\n".join([
        "## 5. Warm-started large batch (Figure 5)",
        f"LB (batch {r['lb_batch']}) trained from the SB iterate after each listed epoch. Paper: {r.get('paper', '')}",
        "",
        md.table(["SB epochs", "train acc", "test acc"] + [f"sharpness ε={e:g}" for e in eps], rows), "",
        f"The SB run itself ends at test accuracy {md.pct(sb.get('test_acc'))} %.", "",
        md.figure(r, "warmstart", "warm-started LB"),
    ])


def plot(result: dict, path) -> Path:
    """Figure 5: LB runs warm-started from SB iterates: test accuracy and sharpness vs warm-start epoch."""
    plt = draw.pyplot()
    rows = [r for r in result["rows"] if not r.get("diverged")]
    starts = [r["warm_epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    ax.plot(starts, [r["test_acc"] for r in rows], "ko-", label="test accuracy (LB)")
    ax.set_xlabel("SB epochs before switching to LB")
    ax.set_ylabel("test accuracy (%)")
    draw.sharpness_beside(ax, starts, rows, result["epsilons"], "semilogy", legend_loc="center right")
    ax.set_title("Warm-started large-batch training")
    return draw.save(fig, path)
