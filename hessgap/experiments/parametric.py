"""Experiment 3, Figures 3 and 7: the loss and accuracy along the line and the curve from x_SB to x_LB.

Linear path: x(α) = α x_LB + (1 − α) x_SB. Curved path: x(α) = sin(απ/2) x_LB + cos(απ/2) x_SB.
Both pass through x_SB at α = 0 and x_LB at α = 1; α runs over [−1, 2] (25 points in the paper).

BatchNorm: each point is evaluated in eval mode with running statistics interpolated by the same
coefficients as the weights (running means and variances are state like any other). A variance that
the extrapolation (α < 0 or α > 1, or the curve's negative coefficients) would make negative is
clamped at 0 (BatchNorm's own ε keeps the division finite) and the number of clamped entries is
recorded per point, since such points say more about the statistics than about the weights. The step counter
``num_batches_tracked`` is taken from x_SB (it does not affect eval mode).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import HessgapError
from . import _figures as draw
from . import _markdown as md
from . import networks
from .paper import FIGURE_NOTES
from .presets import PATHS, Settings
from .runs import RunFolder

NAME = "parametric"


def coefficients(alpha: float, path: str) -> tuple[float, float]:
    """(coefficient of x_SB, coefficient of x_LB) at ``alpha`` on ``path``."""
    if path == "linear":
        return 1.0 - alpha, alpha
    if path == "curved":
        return math.cos(alpha * math.pi / 2), math.sin(alpha * math.pi / 2)
    raise HessgapError(f"unknown interpolation path {path!r}; choose from {', '.join(PATHS)}")


def check_compatible(state_a: dict, state_b: dict) -> None:
    """Both state dicts must come from the same architecture (same keys, shapes and dtypes)."""
    if state_a.keys() != state_b.keys():
        only_a = sorted(set(state_a) - set(state_b))[:3]
        only_b = sorted(set(state_b) - set(state_a))[:3]
        raise HessgapError(
            f"the two models have different architectures (entries only in the first: {only_a}, only in the "
            f"second: {only_b}); interpolate between two networks built with the same model, width and depth"
        )
    for key, a in state_a.items():
        b = state_b[key]
        if a.shape != b.shape:
            raise HessgapError(
                f"the two models differ in {key}: shape {tuple(a.shape)} vs {tuple(b.shape)}; interpolate between "
                "two networks built with the same model, width and depth"
            )


def interpolate_state(state_sb: dict, state_lb: dict, c_sb: float, c_lb: float) -> tuple[dict, int]:
    """c_sb · x_SB + c_lb · x_LB for every floating entry (weights and BatchNorm statistics), and the
    number of BatchNorm running variances that came out negative and were clamped at 0."""
    out, clamped = {}, 0
    for key, a in state_sb.items():
        b = state_lb[key]
        if a.is_floating_point():
            value = c_sb * a + c_lb * b
            if key.endswith("running_var"):
                clamped += int((value < 0).sum())
                value = value.clamp_min(0.0)
            out[key] = value
        else:
            out[key] = a.clone()
    return out, clamped


def curve(model_sb, model_lb, settings: Settings, path: str = "linear", alphas=None, progress: bool = True) -> dict:
    """Train/test loss and accuracy at each α along ``path`` (the two models are left untouched)."""
    state_sb = {k: v.detach() for k, v in model_sb.state_dict().items()}
    state_lb = {k: v.detach() for k, v in model_lb.state_dict().items()}
    check_compatible(state_sb, state_lb)
    if alphas is None:
        alphas = alpha_grid(settings)
    probe = copy.deepcopy(model_sb).eval()
    out = {"alpha": [], "train_loss": [], "test_loss": [], "train_acc": [], "test_acc": [], "clamped_variances": []}
    for alpha in tqdm(alphas, desc=f"{path} path", disable=not progress, leave=False):
        c_sb, c_lb = coefficients(float(alpha), path)
        state, clamped = interpolate_state(state_sb, state_lb, c_sb, c_lb)
        probe.load_state_dict(state)
        out["clamped_variances"].append(clamped)
        values = networks.evaluate(probe, settings)  # a non-finite loss far out on the path is kept as None
        out["alpha"].append(float(alpha))
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            value = values[key]
            out[key].append(value if value is not None and math.isfinite(value) else None)
    return out


def alpha_grid(settings: Settings) -> list[float]:
    low, high = settings.alpha_range
    return [float(a) for a in np.linspace(low, high, settings.alphas)]


def run(folder: RunFolder, settings: Settings, model_sb=None, model_lb=None, names=("x_SB", "x_LB")) -> dict:
    """Both paths between the first seed's SB and LB networks (or two given models), with the figure."""
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    sources = {"sb": names[0], "lb": names[1]}
    if model_sb is None or model_lb is None:
        pair = networks.train_pair(folder, settings, settings.seed)
        for regime, trained in pair.items():
            if trained.diverged is not None:
                raise HessgapError(
                    f"the {regime.upper()} network diverged at epoch {trained.diverged}; there is no minimizer to "
                    "interpolate (lower --lr)"
                )
        model_sb, model_lb = pair["sb"].model, pair["lb"].model
        sources = {"sb": pair["sb"].tag, "lb": pair["lb"].tag}
    with torch.no_grad():
        curves = {path: curve(model_sb, model_lb, settings, path, progress=folder.progress) for path in settings.paths}
    result = {
        "experiment": NAME,
        "settings": settings.to_dict(),
        "models": sources,
        "curves": curves,
        "batchnorm": "eval mode, running statistics interpolated like the weights (variances clamped at 0)",
        "paper": FIGURE_NOTES["parametric"],
    }
    result["figures"] = {"parametric": plot(result, folder.figure("parametric")).name}
    folder.save_result(NAME, result)
    return result


# --- its report section and figure --------------------------------------------------------------------

def _curve_rows(curve: dict, picks=(-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)) -> list[list]:
    rows = []
    alphas = curve["alpha"]
    for target in picks:
        if not alphas or target < min(alphas) - 1e-9 or target > max(alphas) + 1e-9:
            continue
        i = min(range(len(alphas)), key=lambda j: abs(alphas[j] - target))
        clamped = curve.get("clamped_variances", [0] * len(alphas))[i]
        rows.append([f"{alphas[i]:.3g}", md.fmt(curve["train_loss"][i]), md.fmt(curve["test_loss"][i]),
                     md.pct(curve["train_acc"][i]), md.pct(curve["test_acc"][i]), clamped])
    return rows


def render(r: dict) -> str:
    out = ["## 3. Parametric plots (Figures 3 and 7)",
           f"From x_SB (α = 0, {r['models']['sb']}) to x_LB (α = 1, {r['models']['lb']}); BatchNorm: {r['batchnorm']}.",
           f"Paper: {r.get('paper', '')}", ""]
    for name, curve in r["curves"].items():
        out += [f"**{name} path**", "", md.table(["α", "train loss", "test loss", "train acc", "test acc", "clamped BN variances"],
                                                   _curve_rows(curve)), ""]
    out.append(md.figure(r, "parametric", "loss and accuracy along the path"))
    return "\n".join(out)


def plot(result: dict, path) -> Path:
    """Figures 3 and 7: loss (log, left) and accuracy (right) along the path from x_SB (α=0) to x_LB (α=1)."""
    plt = draw.pyplot()
    curves = result["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.8), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        alphas = curve["alpha"]
        ax.semilogy(alphas, draw.positive(curve["train_loss"]), "b-", label="train loss")
        ax.semilogy(alphas, draw.positive(curve["test_loss"]), "b--", label="test loss")
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
    return draw.save(fig, path)
