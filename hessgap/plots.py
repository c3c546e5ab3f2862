"""PNG figures of the paper's experiments, drawn from the results dicts the experiments save.

Each function takes a result (as written to ``results/<name>.json``) and a path, draws with
matplotlib's non-interactive Agg backend and returns the path, so figures can be redrawn from the JSON
alone.
"""

from __future__ import annotations

import math
from pathlib import Path

from ._io import save_figure

COLORS = {"sb": "tab:blue", "lb": "tab:red"}
LABELS = {"sb": "SB", "lb": "LB"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        _pyplot().close(fig)


def _positive(values):
    """Values usable on a log axis (None and non-positive become NaN, which matplotlib skips)."""
    return [v if v is not None and v > 0 else math.nan for v in values]


def gap(result: dict, path) -> Path:
    """Figure for Table 2: train and test accuracy of SB and LB, mean ± std over seeds."""
    plt = _pyplot()
    summary = result["summary"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    groups = ["train_acc", "test_acc"]
    for offset, regime in ((-0.18, "sb"), (0.18, "lb")):
        stats = [summary[regime].get(g) for g in groups]
        means = [s[0] if s else math.nan for s in stats]
        stds = [s[1] if s else 0.0 for s in stats]
        ax.bar([i + offset for i in range(len(groups))], means, width=0.34, yerr=stds, capsize=4,
               color=COLORS[regime], label=f"{LABELS[regime]} (batch {summary[regime]['batch_size']})")
    ax.set_xticks(range(len(groups)), ["train accuracy", "test accuracy"])
    ax.set_ylabel("accuracy (%)")
    lows = [s[0] for r in ("sb", "lb") for g in groups if (s := summary[r].get(g))]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 5.0), 100.5)
    ax.set_title(f"Generalization gap ({result['settings']['model']} on {result['settings']['dataset']})")
    ax.legend(loc="lower right")
    return _save(fig, path)


def sharpness_bars(result: dict, path) -> Path:
    """Figure for Tables 3 and 4: SB vs LB sharpness per space and ε (log scale), mean ± std."""
    plt = _pyplot()
    tables = result["tables"]
    keys = [(space, eps) for space in ("full", "subspace") for eps in result["epsilons"] if tables.get(space)]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(keys) + 1.5), 3.6))
    for offset, regime in ((-0.18, "sb"), (0.18, "lb")):
        stats = [tables[space][regime].get(f"{eps:g}") for space, eps in keys]
        means = _positive([s[0] if s else None for s in stats])
        stds = [s[1] if s else 0.0 for s in stats]
        ax.bar([i + offset for i in range(len(keys))], means, width=0.34, yerr=stds, capsize=4,
               color=COLORS[regime], label=LABELS[regime])
    ax.set_xticks(range(len(keys)), [f"{space}\nε={eps:g}" for space, eps in keys])
    ax.set_yscale("log")
    ax.set_ylabel("sharpness (Metric 2.1)")
    ax.set_title("Sharpness of SB and LB minimizers")
    ax.legend()
    return _save(fig, path)


def parametric(result: dict, path) -> Path:
    """Figures 3 and 7: loss (log, left) and accuracy (right) along the path from x_SB (α=0) to x_LB (α=1)."""
    plt = _pyplot()
    curves = result["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.8), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        alphas = curve["alpha"]
        ax.semilogy(alphas, _positive(curve["train_loss"]), "b-", label="train loss")
        ax.semilogy(alphas, _positive(curve["test_loss"]), "b--", label="test loss")
        ax.set_xlabel("α")
        ax.set_ylabel("cross-entropy", color="b")
        twin = ax.twinx()
        twin.plot(alphas, curve["train_acc"], "r-", label="train accuracy")
        twin.plot(alphas, curve["test_acc"], "r--", label="test accuracy")
        twin.set_ylabel("accuracy (%)", color="r")
        for x in (0.0, 1.0):
            ax.axvline(x, color="gray", lw=0.6, ls=":")
        formula = "α x_LB + (1−α) x_SB" if name == "linear" else "sin(απ/2) x_LB + cos(απ/2) x_SB"
        ax.set_title(f"{name}: {formula}", fontsize=9)
        lines = ax.get_lines()[:2] + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best", framealpha=0.7)
    return _save(fig, path)


def _sharpness_beside(ax, xs, rows, epsilons, plot: str, legend_loc: str) -> None:
    """Sharpness curves (one per ε) on a right-hand log axis beside the accuracy on ``ax``, one legend for both;
    ``plot`` is the twin axis' plotting method ("loglog" or "semilogy")."""
    twin = ax.twinx()
    for eps, style in zip(epsilons, ("s-", "^--", "v:")):
        getattr(twin, plot)(xs, _positive([r["sharpness"].get(f"{eps:g}") for r in rows]), style, color="tab:red",
                            label=f"sharpness ε={eps:g}")
    twin.set_ylabel("sharpness", color="tab:red")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc=legend_loc)


def sweep(result: dict, path) -> Path:
    """Figure 4: test accuracy and sharpness against the batch size."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if not r.get("diverged")]
    batches = [r["batch_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    ax.semilogx(batches, [r["test_acc"] for r in rows], "ko-", label="test accuracy")
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%)")
    _sharpness_beside(ax, batches, rows, result["epsilons"], "loglog", legend_loc="center left")
    ax.set_title("Batch-size sweep")
    return _save(fig, path)


def warmstart(result: dict, path) -> Path:
    """Figure 5: LB runs warm-started from SB iterates: test accuracy and sharpness vs warm-start epoch."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if not r.get("diverged")]
    starts = [r["warm_epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    ax.plot(starts, [r["test_acc"] for r in rows], "ko-", label="test accuracy (LB)")
    ax.set_xlabel("SB epochs before switching to LB")
    ax.set_ylabel("test accuracy (%)")
    _sharpness_beside(ax, starts, rows, result["epsilons"], "semilogy", legend_loc="center right")
    ax.set_title("Warm-started large-batch training")
    return _save(fig, path)


def along_training(result: dict, path) -> Path:
    """Figure 6: sharpness against the training loss along training (log-log), SB and LB."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for regime in ("sb", "lb"):
        points = result["curves"].get(regime, [])
        losses = _positive([p["train_loss"] for p in points])
        values = _positive([p["sharpness"] for p in points])
        ax.loglog(losses, values, "o-", color=COLORS[regime], label=LABELS[regime])
        if points:
            ax.annotate(f"epoch {points[-1]['epoch']}", (losses[-1], values[-1]), fontsize=7)
    ax.invert_xaxis()  # training proceeds to the right, as the loss falls
    ax.set_xlabel("training cross-entropy (falls →)")
    ax.set_ylabel(f"sharpness ε={result['epsilon']:g}")
    ax.set_title("Sharpness along training")
    ax.legend()
    return _save(fig, path)


def remedies(result: dict, path) -> Path:
    """Appendix E: LB test accuracy and sharpness per remedy, beside plain SB and LB."""
    plt = _pyplot()
    rows = result["rows"]
    names = [r["name"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(7.0, 1.3 * len(rows) + 4), 3.6))
    acc = [r["test_acc"][0] if r.get("test_acc") else math.nan for r in rows]
    acc_err = [r["test_acc"][1] if r.get("test_acc") else 0.0 for r in rows]
    left.bar(names, acc, yerr=acc_err, capsize=4, color="tab:green")
    finite = [a for a in acc if not math.isnan(a)]
    left.set_ylim(max(0.0, min(finite, default=0.0) - 5.0), 100.0)
    left.set_ylabel("test accuracy (%)")
    eps = result["epsilon"]
    sharp = _positive([r["sharpness"][0] if r.get("sharpness") else None for r in rows])
    sharp_err = [r["sharpness"][1] if r.get("sharpness") else 0.0 for r in rows]
    right.bar(names, sharp, yerr=sharp_err, capsize=4, color="tab:purple")
    right.set_yscale("log")
    right.set_ylabel(f"sharpness ε={eps:g}")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("Remedies for large-batch training")
    return _save(fig, path)


def spectrum(result: dict, path) -> Path:
    """Top Hessian eigenvalues of the SB and LB minimizers (log scale where positive)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for regime, marker in (("sb", "o"), ("lb", "s")):
        entry = result["models"].get(regime)
        if not entry or not entry.get("eigenvalues"):
            continue
        values = entry["eigenvalues"]
        ax.plot(range(1, len(values) + 1), _positive(values), marker + "-", color=COLORS[regime],
                label=f"{LABELS[regime]} (sharpness {entry['sharpness']:.3g})" if entry.get("sharpness") is not None
                else LABELS[regime])
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i of the training-loss Hessian")
    ax.set_title("Top Hessian eigenvalues")
    ax.legend()
    return _save(fig, path)


def density(result: dict, path) -> Path:
    """Spectral densities of the SB and LB Hessians (stochastic Lanczos quadrature)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for regime in ("sb", "lb"):
        entry = result["models"].get(regime, {}).get("density")
        if entry:
            ax.semilogy(entry["grid"], _positive(entry["density"]), color=COLORS[regime], label=LABELS[regime])
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title("Hessian spectral density")
    ax.legend()
    return _save(fig, path)


def history(histories: dict[str, list[dict]], path) -> Path:
    """Training curves (loss and accuracy per epoch) of one or more runs."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for name, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        color = COLORS.get(name)
        left.semilogy(epochs, _positive([r.get("train_loss") for r in rows]), "-", color=color, label=f"{name} train")
        left.semilogy(epochs, _positive([r.get("test_loss") for r in rows]), "--", color=color, label=f"{name} test")
        right.plot(epochs, [r.get("train_acc") for r in rows], "-", color=color, label=f"{name} train")
        right.plot(epochs, [r.get("test_acc") for r in rows], "--", color=color, label=f"{name} test")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    return _save(fig, path)
