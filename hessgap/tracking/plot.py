"""The tracker's figure: every measure of a run against the step, beside the loss, drawn from the records alone.

λmax and critical sharpness share one panel (they measure the same curvature two ways), with the edge of
stability 2/η of the records' learning rate; the trace, Metric 2.1 and the edge-of-stability ratio get their
own. A bare matplotlib ``Figure`` renders with the Agg canvas and leaves pyplot's global backend alone.
"""

from __future__ import annotations

import io
import math

#: (panel title, [(measure, label, style)]) in the order the panels are drawn
PANELS = (
    ("loss over the tracked data", [("loss", "loss", "k-")]),
    ("curvature", [("lambda_max", "λmax (Lanczos)", "C0o-"), ("critical_sharpness", "λc (critical sharpness)", "C3s-"),
                   ("relative_critical_sharpness", "λc 1→2 (relative)", "C2^--")]),
    ("Hessian trace (Hutchinson)", [("trace", "trace", "C1o-")]),
    ("sharpness (Metric 2.1, %)", [("sharpness", "ε-sharpness", "C4o-")]),
    ("edge-of-stability ratio", [("eos_ratio", "λmax·η / limit", "C5o-")]),
)


def _values(history: list[dict], key: str) -> list[float]:
    return [r.get(key) if isinstance(r.get(key), (int, float)) else math.nan for r in history]


def render(history: list[dict], *, title: str | None = None, dpi: int = 110) -> bytes:
    """The figure of ``history`` (the tracker's records) as PNG bytes."""
    from matplotlib.figure import Figure

    panels = [(name, [line for line in lines if any(isinstance(r.get(line[0]), (int, float)) for r in history)])
              for name, lines in PANELS]
    panels = [(name, lines) for name, lines in panels if lines]
    figure = Figure(figsize=(6.4, 2.2 * max(len(panels), 1) + 0.4), dpi=dpi)
    steps = [r["step"] for r in history]
    for index, (name, lines) in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, index + 1)
        for key, label, style in lines:
            axes.plot(steps, _values(history, key), style, markersize=3, linewidth=1.2, label=label)
        if name == "curvature" and any(isinstance(r.get("lr"), (int, float)) for r in history):
            axes.plot(steps, [2.0 / r["lr"] if r.get("lr") else math.nan for r in history], ":", color="0.4",
                      label="2/η (edge of stability)")
        if name == "edge-of-stability ratio":
            axes.axhline(1.0, linestyle=":", color="0.4")
        positive = all(v > 0 for key, _, _ in lines for v in _values(history, key) if not math.isnan(v))
        if (name.startswith("loss") or name == "curvature") and positive:
            axes.set_yscale("log")  # λmax and λc far below 2/η early in a run stay readable
        axes.set_title(name, fontsize=9)
        axes.grid(True, alpha=0.3)
        if len(lines) > 1 or name == "curvature":
            axes.legend(fontsize=7)
        if index == len(panels) - 1:
            axes.set_xlabel("step")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
