"""``hessgap measures``: every measure of :func:`hessgap.measures` (or the ones named) of a saved network, over
its training set, with the invariance check."""

from __future__ import annotations

from ..measures.api import measures as compute_measures
from ..measures.llc_checks import plot_traces
from . import _markdown as md
from . import networks
from .runs import RunFolder
from .saved import SavedModel, settings_for

NAME = "model_measures"


def run(folder: RunFolder, saved: SavedModel, names=None, seed: int = 0, data_root=None, eval_batch: int = 1024,
        max_batches=None, device: str = "auto", check_invariance: bool = True, options: dict | None = None) -> dict:
    """The measures of a saved network (:func:`.saved.load`), or the stored result."""
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    settings = settings_for(saved.result, data_root, eval_batch, max_batches, device)
    loader = networks.analysis_loader(settings)
    result = compute_measures(saved.result.model, loader, names, seed=seed, check_invariance=check_invariance,
                              options=options, progress=folder.progress)
    folder.log(f"measured {len(result.values)} measures in {result.total_seconds:.1f} s")
    out = {"experiment": NAME, "model": str(saved.file), "model_sha256": saved.sha256,
           "data": f"training set of {settings.dataset} ({len(loader.dataset)} samples)", **result.to_dict()}
    if result.values.get("llc") is not None:
        out["figures"] = {"llc_traces": plot_traces(result.details["llc"], folder.figure("llc_traces")).name}
    folder.save_result(NAME, out)
    return out


def lines(r: dict) -> list[str]:
    """One line per measure: value ± stderr, the checked invariance, the time; or n/a with the reason."""
    out = []
    for name, value in r["values"].items():
        if value is None:
            out.append(f"{name}: n/a ({r['not_applicable'].get(name, '')})")
            continue
        err = r["stderr"].get(name)
        inv = {True: "invariant", False: "not invariant", None: "invariance not checked"}[r["invariant"].get(name)]
        out.append(f"{name}: {value:.5g}" + (f" ± {err:.2g}" if err is not None else "") +
                   f" ({inv}, {r['seconds'][name]:.1f} s)")
        for check in r.get("details", {}).get(name, {}).get("diagnostics", []) if name == "llc" else []:
            out.append(f"  {'ok' if check['ok'] else 'FLAGGED'} {check['check']}: {check['message']}")
    return out


def render(r: dict) -> str:
    rows = []
    for name, value in r["values"].items():
        entry = r.get("invariance", {}).get(name, {})
        inv = r["invariant"].get(name)
        checked = "–" if inv is None else f"{'yes' if inv else 'no'} ({100 * entry.get('change', 0):.2g} %)"
        declared = {True: "yes", False: "no", None: "–"}[entry.get("declared")]
        rows.append([name, "n/a" if value is None else md.fmt(value), md.fmt(r["stderr"].get(name), 2), checked,
                     declared, md.fmt(r["seconds"].get(name), 3),
                     r.get("not_applicable", {}).get(name, "; ".join(r.get("notes", {}).get(name, [])))])
    return "\n".join([
        f"## Measures of {r['model']}",
        f"Model file sha256: {r.get('model_sha256', '–')}. Data: {r.get('data', '–')}. Rescaling checked against: "
        f"{r.get('rescaling') or '–'}.",
        "",
        md.table(["measure", "value", "stderr", "invariant (checked, change)", "invariant (literature)", "seconds",
                  "note"], rows),
        *_llc_section(r),
    ])


def _llc_section(r: dict) -> list[str]:
    """The LLC's diagnostics and its traces' figure, when the LLC was measured."""
    details = r.get("details", {}).get("llc")
    if not details:
        return []
    lines = ["", "### Local learning coefficient",
             f"nβ = {details['n_beta']:.4g}, step size {details['step_size']:.3g}, localization "
             f"{details['localization']:.3g}, {details['chains']} chains × {details['draws']} draws after "
             f"{details['burn_in']} burn-in steps. Diagnostics:", ""]
    lines += [f"- {'ok' if c['ok'] else '**flagged**'} {c['check']}: {c['message']}" for c in details["diagnostics"]]
    if details.get("suggested"):
        lines.append("- suggested settings: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                                          for k, v in details["suggested"].items()))
    return lines + ["", md.figure(r, "llc_traces", "LLC traces: nβ·(L_m(w_t) − L_m(w*)) per chain")]
