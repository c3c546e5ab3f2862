"""``hessgap demo``: the paper's headline in a few minutes on a CPU, on MNIST-1D (or the embedded digits).

Trains an F1-type network (5 × [Linear, BatchNorm, ReLU], narrowed to fit a CPU) with a small and a
large batch from the same initial weights, for two seeds, then reports the generalization gap, the
sharpness of both minimizers (Metric 2.1, full space, ε = 1e-3), as mean ± std over the seeds, their top
Hessian eigenvalues and the parametric plot between them. Everything lands in a run folder with a
report.md, and a rerun resumes.

MNIST-1D (generated locally) is the default because it shows the gap: LB fits the training set and tests
several points worse. On digits (``dataset="digits"``) LB comes out sharper too but generalizes as well
as SB: the task is too easy for the gap to show.
"""

from __future__ import annotations

from .presets import DEMO_DATASET, Settings, preset
from .spectrum import DISAGREEMENT, disagree

__all__ = ["DEMO_DATASET", "demo_settings", "summary_lines"]


def demo_settings(seed: int = 0, device: str = "auto", dataset: str = DEMO_DATASET) -> Settings:
    """The quick preset's networks (F1 at half width, SB 16 vs LB half the training set, 2 seeds), measured
    with Metric 2.1 in the full space at ε = 1e-3 only, the top 5 eigenvalues and both paths.

    ``dataset`` is MNIST-1D (default: generated locally, where the small-batch network generalizes better)
    or the embedded digits (too easy for the gap to show)."""
    return preset("quick", dataset=dataset).replace(
        seed=seed,
        epsilons=(1e-3,),
        subspace_dim=None,
        sharpness_every=0,
        experiments=("gap", "sharpness", "spectrum", "parametric"),
        device=device,
    )


def _pm(pair, digits: str = ".2f") -> str:
    """A (mean, std) pair as "mean ± std" in the format ``digits``."""
    return f"{pair[0]:{digits}} ± {pair[1]:{digits}}"


def summary_lines(results: dict) -> list[str]:
    """What the demo prints: gap, sharpness (mean ± std over the seeds), eigenvalues (first seed), and
    where the figures are."""
    lines = []
    gap = results.get("gap")
    if gap and "summary" in gap:
        s = gap["summary"]
        settings = gap.get("settings", {})
        if settings:
            runs = s["sb"]["runs"] + len(s["sb"]["diverged"])
            lines.append(f"{settings.get('model')} (width ×{settings.get('width', 1):g}) on {settings.get('dataset')}, "
                         f"{runs} seeds: mean ± std over the seeds")
        for regime in ("sb", "lb"):
            r = s[regime]
            if r["runs"]:
                lines.append(
                    f"{regime.upper()} (batch {r['batch_size']:>4}): train accuracy {_pm(r['train_acc'])} %, "
                    f"test accuracy {_pm(r['test_acc'])} %, train loss {_pm(r['train_loss'], '.3g')}"
                )
            else:
                lines.append(f"{regime.upper()}: diverged (see run.log)")
        if s.get("test_gap"):
            lines.append(f"generalization gap (test SB − test LB): {_pm(s['test_gap'])} points")
        if s.get("distance_ratio"):
            lines.append(f"‖x_SB − x0‖ / ‖x_LB − x0‖ = {_pm(s['distance_ratio'])} (paper: 3 to 10)")
    sharp = results.get("sharpness")
    sharpness_ratio = None  # LB / SB at the first ε, set against the eigenvalues' below
    if sharp and "tables" in sharp:
        full = sharp["tables"]["full"]
        for eps in sharp["epsilons"]:
            sb, lb = full["sb"].get(f"{eps:g}"), full["lb"].get(f"{eps:g}")
            if sb and lb:
                ratio = f" (LB / SB = {lb[0] / sb[0]:.3g})" if sb[0] > 0 else ""
                if sb[0] > 0 and sharpness_ratio is None:
                    sharpness_ratio = lb[0] / sb[0]
                lines.append(f"sharpness (full space, ε={eps:g}): SB {_pm(sb, '.4g')}, LB {_pm(lb, '.4g')}{ratio}")
    spec = results.get("spectrum")
    if spec and "models" in spec:
        seed = (spec.get("settings") or {}).get("seed")
        which = f" (seed {seed})" if seed is not None else ""
        for regime in ("sb", "lb"):
            m = spec["models"].get(regime, {})
            if m.get("eigenvalues"):
                trace = f"; trace {m['trace']:.4g}" if m.get("trace") is not None else ""
                lines.append(f"top Hessian eigenvalues {regime.upper()}{which}: "
                             + ", ".join(f"{v:.4g}" for v in m["eigenvalues"]) + trace)
        if spec.get("top_ratio_lb_sb") is not None:
            lines.append(f"largest eigenvalue LB / SB: {spec['top_ratio_lb_sb']:.3g}")
            if disagree(sharpness_ratio, spec["top_ratio_lb_sb"]):
                lines.append(DISAGREEMENT)
    for name, result in results.items():
        if isinstance(result, dict) and "error" in result:
            lines.append(f"{name}: failed: {result['error']}")
    return lines
