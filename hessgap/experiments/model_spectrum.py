"""``hessgap spectrum``: the top Hessian eigenvalues of a saved network over its training set (Lanczos),
optionally its trace (Hutchinson) and its spectral density (stochastic Lanczos quadrature) with its plot."""

from __future__ import annotations

from functools import partial

from ..spectrum import density, eigenvalues, trace
from . import _markdown as md
from . import networks
from .runs import RunFolder
from .saved import SavedModel, settings_for

NAME = "model_spectrum"


def run(folder: RunFolder, saved: SavedModel, k=10, with_trace=False, with_density=False, probes=64, seed=0,
        data_root=None, eval_batch=1024, max_batches=None, device="auto") -> dict:
    """Top-k Hessian eigenvalues of a saved network (:func:`.saved.load`); optionally its trace and spectral
    density."""
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    result = saved.result
    settings = settings_for(result, data_root, eval_batch, max_batches, device)
    loader = networks.analysis_loader(settings)
    parts = folder.parts(NAME)
    out = {"experiment": NAME, "model": str(saved.file), "model_sha256": saved.sha256,
           "data": f"training set of {settings.dataset} ({len(loader.dataset)} samples)", "figures": {}}
    eig = parts.compute(f"eigenvalues/k{k}", partial(_eigen, result.model, loader, k, seed, folder.progress))
    out["eigenvalues"] = eig["eigenvalues"]
    out["eigen"] = eig
    if with_trace:
        out["trace"] = parts.compute(f"trace/p{probes}",
                                     partial(_trace, result.model, loader, probes, seed, folder.progress))
    if with_density:
        out["density"] = parts.compute("density", partial(_density, result.model, loader, seed, folder.progress,
                                                          folder.figure("density")))
        out["figures"]["density"] = "density.png"
    folder.save_result(NAME, out)
    return out


def _eigen(model, loader, k, seed, progress) -> dict:
    found = eigenvalues(model, loader, k=k, seed=seed, progress=progress)
    out = found.to_dict()
    out.pop("eigenvectors", None)
    out["eigenvalues"] = [float(v) for v in found.eigenvalues]
    return out


def _trace(model, loader, probes, seed, progress) -> dict:
    return trace(model, loader, num_probes=probes, seed=seed, progress=progress).to_dict()


def _density(model, loader, seed, progress, png) -> dict:
    """The spectral density; its plot is drawn by :func:`hessgap.density` into ``png``."""
    return density(model, loader, seed=seed, progress=progress, save_png=str(png)).to_dict()


# --- its report section ------------------------------------------------------------------------------

def render(r: dict) -> str:
    out = [f"## Hessian spectrum of {r['model']}",
           f"Model file sha256: {r.get('model_sha256', '–')}. Data: {r.get('data', '–')}.", ""]
    if r.get("eigenvalues") is not None:
        out.append(f"Top {len(r['eigenvalues'])} eigenvalues: " + ", ".join(f"{v:.5g}" for v in r["eigenvalues"]))
    if r.get("trace") is not None:
        out.append(f"\nTrace (Hutchinson): {md.fmt(r['trace'].get('value'))}")
    if r.get("figures", {}).get("density"):
        out += ["", md.figure(r, "density", "spectral density")]
    return "\n".join(out)
