"""Markdown pieces the experiments' report sections share: numbers, mean ± std, tables, figure links,
and how a run's scale and the paper's data are named."""

from __future__ import annotations

from .paper import PAPER_DATASET, format_pair


def fmt(value, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; a (mean, std) pair as "mean ± std"; None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return format_pair(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def pct(value) -> str:
    """A percentage (or a (mean, std) pair of them) with two decimals; None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return f"{value[0]:.2f} ± {value[1]:.2f}"
    return f"{value:.2f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(result: dict, name: str, caption: str) -> str:
    """The image link of the result's figure ``name`` (figures/<file>), or nothing when it has none."""
    file = result.get("figures", {}).get(name)
    return f"![{caption}](figures/{file})" if file else ""


def scale(s: dict) -> str:
    """How the run's network and data differ from the paper's, in a few words."""
    net = s["model"]
    size = "" if s.get("width", 1) == 1 and s.get("depth", 1) == 1 else f" (width ×{s['width']:g}, depth ×{s['depth']:g})"
    return f"{net}{size} on {s['dataset']}"


def paper_label(model: str) -> str:
    return f"paper: {model} on {PAPER_DATASET.get(model, '?')}"
