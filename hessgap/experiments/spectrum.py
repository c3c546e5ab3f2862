"""Experiment 8: the top Hessian eigenvalues of the SB and LB minimizers, beside their sharpness.

The paper characterizes sharp minimizers by many large positive eigenvalues of the Hessian of the
training loss; this puts Lanczos' top-k eigenvalues (and, with ``trace_probes``, Hutchinson's trace)
next to Metric 2.1 at the first ε (full space). The two need not agree: Metric 2.1 is the loss rise
over a box of ℓ2 radius about ε·√n, far beyond the quadratic neighbourhood the Hessian describes.
"""

from __future__ import annotations

from .. import plots
from . import networks
from .paper import FIGURE_NOTES
from .presets import Settings
from .runs import RunFolder

NAME = "spectrum"


def eigenvalues(model, settings: Settings, k: int) -> dict:
    """Top-k eigenvalues of the training-loss Hessian of ``model`` over the analysis data."""
    import hessgap

    result = hessgap.eigenvalues(model, networks.analysis_loader(settings), k=k)
    out = result.to_dict()
    out.pop("eigenvectors", None)  # n × k floats: kept out of the JSON
    out["eigenvalues"] = [float(v) for v in result.eigenvalues]
    return out


def run(folder: RunFolder, settings: Settings) -> dict:
    """Eigenvalues and full-space sharpness (first ε) of the first seed's SB and LB networks."""
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    import hessgap

    pair = networks.train_pair(folder, settings, settings.seed)
    parts = folder.parts(NAME)
    eps = settings.epsilons[0]
    models = {}
    for regime, trained in pair.items():
        if trained.diverged is not None:
            models[regime] = {"model": trained.tag, "diverged": trained.diverged}
            continue
        spectrum = parts.compute(f"{trained.tag}/k{settings.spectrum_k}",
                                 lambda: eigenvalues(trained.model, settings, settings.spectrum_k))
        folder.log(f"top eigenvalues of {trained.tag}: {', '.join(f'{v:.4g}' for v in spectrum['eigenvalues'])}")
        sharp = networks.sharpness(folder, trained, settings, eps, seed=settings.seed)
        trace = None
        if settings.trace_probes:
            trace = parts.compute(f"{trained.tag}/trace{settings.trace_probes}",
                                  lambda: hessgap.trace(trained.model, networks.analysis_loader(settings),
                                                        num_probes=settings.trace_probes, seed=settings.seed).to_dict())
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
    result["figures"] = {"spectrum": plots.spectrum(result, folder.figure("spectrum")).name}
    folder.save_result(NAME, result)
    return result
