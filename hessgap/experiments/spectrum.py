"""Experiment 8: the top Hessian eigenvalues of the SB and LB minimizers, beside their sharpness.

The paper characterizes sharp minimizers by many large positive eigenvalues of the Hessian of the
training loss; this puts Lanczos' top-k eigenvalues (and, with ``trace_probes``, Hutchinson's trace)
next to Metric 2.1 at the first ε (full space). The two need not agree: Metric 2.1 is the loss rise
over a box of ℓ2 radius about ε·√n, far beyond the quadratic neighbourhood the Hessian describes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ..spectrum import eigenvalues as lanczos_eigenvalues
from ..spectrum import trace as hutchinson_trace
from . import _figures as draw
from . import _markdown as md
from . import networks
from .paper import FIGURE_NOTES
from .presets import Settings
from .runs import RunFolder

NAME = "spectrum"

#: Why Metric 2.1 and the Hessian at the point may rank SB and LB in opposite orders; said where they do.
DISAGREEMENT = (
    "Sharpness and λ_max disagree, as they can: Metric 2.1 is the worst loss rise over a box of ℓ2 radius about "
    "ε·√n, far outside the quadratic region where the Hessian describes the loss;\n"
    "near zero training loss the cross-entropy Hessian shrinks with p(1−p) while the loss a finite step away still "
    "rises steeply, and BatchNorm's scale symmetry makes weight-space sizes arbitrary."
)


def disagree(sharpness_ratio: float | None, eigenvalue_ratio: float | None) -> bool:
    """Whether LB / SB of Metric 2.1 and LB / SB of the top eigenvalue lie on opposite sides of 1."""
    if sharpness_ratio is None or eigenvalue_ratio is None:
        return False
    return (sharpness_ratio - 1.0) * (eigenvalue_ratio - 1.0) < 0


def eigenvalues(model, settings: Settings, k: int) -> dict:
    """Top-k eigenvalues of the training-loss Hessian of ``model`` over the analysis data."""
    result = lanczos_eigenvalues(model, networks.analysis_loader(settings), k=k)
    out = result.to_dict()
    out.pop("eigenvectors", None)  # n × k floats: kept out of the JSON
    out["eigenvalues"] = [float(v) for v in result.eigenvalues]
    return out


def hessian_trace(model, settings: Settings) -> dict:
    """Hutchinson's estimate of the training-loss Hessian's trace with ``settings.trace_probes`` probes."""
    return hutchinson_trace(model, networks.analysis_loader(settings), num_probes=settings.trace_probes,
                            seed=settings.seed).to_dict()


def run(folder: RunFolder, settings: Settings) -> dict:
    """Eigenvalues and full-space sharpness (first ε) of the first seed's SB and LB networks."""
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    pair = networks.train_pair(folder, settings, settings.seed)
    parts = folder.parts(NAME)
    eps = settings.epsilons[0]
    models = {}
    for regime, trained in pair.items():
        if trained.diverged is not None:
            models[regime] = {"model": trained.tag, "diverged": trained.diverged}
            continue
        spectrum = parts.compute(f"{trained.tag}/k{settings.spectrum_k}",
                                 partial(eigenvalues, trained.model, settings, settings.spectrum_k))
        folder.log(f"top eigenvalues of {trained.tag}: {', '.join(f'{v:.4g}' for v in spectrum['eigenvalues'])}")
        sharp = networks.sharpness(folder, trained, settings, eps, seed=settings.seed)
        trace = None
        if settings.trace_probes:
            trace = parts.compute(f"{trained.tag}/trace{settings.trace_probes}", partial(hessian_trace, trained.model, settings))
        models[regime] = {
            "model": trained.tag,
            "eigenvalues": spectrum["eigenvalues"],
            "residuals": spectrum.get("residuals"),
            "hvps": spectrum.get("hvps"),
            "seconds": spectrum.get("seconds"),
            "sharpness": sharp["value"],
            "loss": sharp["loss"],
            "trace": trace["value"] if trace else None,
            "trace_ci": trace.get("ci") if trace else None,
        }
    top = {r: m["eigenvalues"][0] for r, m in models.items() if m.get("eigenvalues")}
    result = {
        "experiment": NAME,
        "settings": settings.to_dict(),
        "epsilon": eps,
        "k": settings.spectrum_k,
        "models": models,
        "top_ratio_lb_sb": top["lb"] / top["sb"] if len(top) == 2 and top["sb"] > 0 else None,
        "paper": FIGURE_NOTES["spectrum"],
    }
    result["figures"] = {"spectrum": plot(result, folder.figure("spectrum")).name}
    folder.save_result(NAME, result)
    return result


# --- its report section and figure --------------------------------------------------------------------

def render(r: dict) -> str:
    rows = []
    for regime, m in r["models"].items():
        if m.get("eigenvalues"):
            rows.append([regime.upper(), ", ".join(f"{v:.4g}" for v in m["eigenvalues"]), md.fmt(m.get("trace")),
                         md.fmt(m["sharpness"]), md.fmt(m.get("loss")), m.get("hvps", "–")])
        else:
            rows.append([regime.upper(), f"diverged at epoch {m.get('diverged')}", "–", "–", "–", "–"])
    ratio = r.get("top_ratio_lb_sb")
    sharp = {regime: m.get("sharpness") for regime, m in r["models"].items()}
    sharp_ratio = sharp["lb"] / sharp["sb"] if sharp.get("lb") is not None and sharp.get("sb") else None
    note = ["", DISAGREEMENT.replace("\n", " ")] if disagree(sharp_ratio, ratio) else []
    return "\n".join([
        "## 8. Top Hessian eigenvalues beside sharpness",
        f"Top {r['k']} eigenvalues of the training-loss Hessian (Lanczos) and Metric 2.1 (full space, ε={r['epsilon']:g}).",
        "",
        md.table(["", "top eigenvalues", "trace (Hutchinson)", f"sharpness ε={r['epsilon']:g}", "f(x)", "HVPs (Lanczos)"], rows),
        "",
        f"λ_max(LB) / λ_max(SB) = {md.fmt(ratio, 3)}. Paper: {r.get('paper', '')}",
        *note,
        "",
        md.figure(r, "spectrum", "top eigenvalues"),
    ])


def plot(result: dict, path) -> Path:
    """Top Hessian eigenvalues of the SB and LB minimizers (log scale where positive)."""
    plt = draw.pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for regime, marker in (("sb", "o"), ("lb", "s")):
        entry = result["models"].get(regime)
        if not entry or not entry.get("eigenvalues"):
            continue
        values = entry["eigenvalues"]
        ax.plot(range(1, len(values) + 1), draw.positive(values), marker + "-", color=draw.COLORS[regime],
                label=f"{draw.LABELS[regime]} (sharpness {entry['sharpness']:.3g})" if entry.get("sharpness") is not None
                else draw.LABELS[regime])
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i of the training-loss Hessian")
    ax.set_title("Top Hessian eigenvalues")
    ax.legend()
    return draw.save(fig, path)
