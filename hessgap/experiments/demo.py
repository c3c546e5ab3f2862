"""``hessgap demo``: the paper's headline in a few minutes on a CPU, on the embedded digits data (or MNIST-1D).

Trains an F1-type network (5 × [Linear, BatchNorm, ReLU], narrowed to fit a CPU) with a small and a
large batch from the same initial weights, then reports the generalization gap, the sharpness of both
minimizers (Metric 2.1, full space, ε = 1e-3), their top Hessian eigenvalues and the parametric plot
between them. Everything lands in a run folder with a report.md, and a rerun resumes.
"""

from __future__ import annotations

from .presets import Settings, preset
from .spectrum import DISAGREEMENT, disagree


def demo_settings(seed: int = 0, device: str = "auto", dataset: str = "digits") -> Settings:
    """The quick preset's networks (F1 at half width, SB 16 vs LB half the training set, 2 seeds), measured
    with Metric 2.1 in the full space at ε = 1e-3 only, the top 5 eigenvalues and both paths.

    ``dataset`` is the embedded digits (default) or MNIST-1D, generated locally, where the small-batch
    network also generalizes better (digits is too easy for the gap to show)."""
    return preset("quick", dataset=dataset).replace(
        seed=seed,
        epsilons=(1e-3,),
        subspace_dim=None,
        sharpness_every=0,
        experiments=("gap", "sharpness", "spectrum", "parametric"),
        device=device,
    )


def summary_lines(results: dict) -> list[str]:
    """What the demo prints: gap, sharpness, eigenvalues, and where the figures are."""
    lines = []
    gap = results.get("gap")
    if gap and "summary" in gap:
        s = gap["summary"]
        for regime in ("sb", "lb"):
            r = s[regime]
            if r["runs"]:
                lines.append(
                    f"{regime.upper()} (batch {r['batch_size']:>4}): train accuracy {r['train_acc'][0]:6.2f} %, "
                    f"test accuracy {r['test_acc'][0]:6.2f} %, train loss {r['train_loss'][0]:.3g}"
                )
            else:
                lines.append(f"{regime.upper()}: diverged (see run.log)")
        if s.get("test_gap"):
            lines.append(f"generalization gap (test SB − test LB): {s['test_gap'][0]:.2f} points")
        if s.get("distance_ratio"):
            lines.append(f"‖x_SB − x0‖ / ‖x_LB − x0‖ = {s['distance_ratio'][0]:.2f} (paper: 3 to 10)")
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
                lines.append(f"sharpness (full space, ε={eps:g}): SB {sb[0]:.4g}, LB {lb[0]:.4g}{ratio}")
    spec = results.get("spectrum")
    if spec and "models" in spec:
        for regime in ("sb", "lb"):
            m = spec["models"].get(regime, {})
            if m.get("eigenvalues"):
                trace = f"; trace {m['trace']:.4g}" if m.get("trace") is not None else ""
                lines.append(f"top Hessian eigenvalues {regime.upper()}: " + ", ".join(f"{v:.4g}" for v in m["eigenvalues"])
                             + trace)
        if spec.get("top_ratio_lb_sb") is not None:
            lines.append(f"largest eigenvalue LB / SB: {spec['top_ratio_lb_sb']:.3g}")
            if disagree(sharpness_ratio, spec["top_ratio_lb_sb"]):
                lines.append(DISAGREEMENT)
    for name, result in results.items():
        if isinstance(result, dict) and "error" in result:
            lines.append(f"{name}: failed: {result['error']}")
    return lines
