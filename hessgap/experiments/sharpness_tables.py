"""Experiment 2, Tables 3 and 4: sharpness of the SB and LB minimizers, full space and random subspace."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from . import _figures as draw
from . import _markdown as md
from . import networks
from .paper import TABLE3, TABLE4
from .presets import Settings
from .runs import RunFolder

NAME = "sharpness"


def spaces(settings: Settings) -> list[tuple[str, int | None]]:
    """("full", None) and, unless disabled, ("subspace", p)."""
    out = [("full", None)]
    if settings.subspace_dim is not None:
        out.append(("subspace", settings.subspace_dim))
    return out


def run(folder: RunFolder, settings: Settings) -> dict:
    """Metric 2.1 at every ε of the settings, in the full space (A = I) and in a random p-dim subspace.

    Each network is measured at its trained weights over the training set; the subspace's random A is
    drawn from the network's seed, so every seed sees a different A. Each value is saved as soon as it
    is measured, so an interrupted run redoes only the missing ones.
    """
    stored = folder.load_result(NAME)
    if stored is not None:
        return stored
    jobs = []
    for seed in settings.seed_list():
        pair = networks.train_pair(folder, settings, seed)
        for regime, trained in pair.items():
            if trained.diverged is None:
                for space, dim in spaces(settings):
                    for eps in settings.epsilons:
                        jobs.append((seed, regime, trained, space, dim, eps))
    rows = []
    for seed, regime, trained, space, dim, eps in tqdm(jobs, desc="sharpness", disable=not folder.progress):
        value = networks.sharpness(folder, trained, settings, eps, subspace_dim=dim, seed=seed)
        rows.append({"seed": seed, "regime": regime, "space": space, "subspace_dim": dim, "epsilon": eps,
                     "model": trained.tag, **value})
    tables = {}
    for space, _ in spaces(settings):
        tables[space] = {
            regime: {
                f"{eps:g}": networks.mean_std(
                    r["value"] for r in rows if r["space"] == space and r["regime"] == regime and r["epsilon"] == eps
                )
                for eps in settings.epsilons
            }
            for regime in ("sb", "lb")
        }
    result = {
        "experiment": NAME,
        "settings": settings.to_dict(),
        "epsilons": list(settings.epsilons),
        "rows": rows,
        "tables": tables,
        "paper": {"full": _paper(TABLE3, settings.model), "subspace": _paper(TABLE4, settings.model)},
    }
    result["figures"] = {"sharpness": plot(result, folder.figure("sharpness")).name}
    folder.save_result(NAME, result)
    return result


def _paper(table: dict, model: str) -> dict:
    rows = table.get(model)
    if rows is None:
        return {}
    return {regime: {f"{eps:g}": list(rows[(regime, eps)]) for r, eps in rows if r == regime} for regime in ("sb", "lb")}


# --- its report section and figure --------------------------------------------------------------------

def render(r: dict) -> str:
    s, eps = r["settings"], r["epsilons"]
    header = [""] + [f"{reg.upper()} ε={e:g}" for e in eps for reg in ("sb", "lb")] + [f"LB/SB ε={e:g}" for e in eps]
    rows = []
    titles = {"full": ("full space", "Table 3"), "subspace": (f"{s.get('subspace_dim')}-dim subspace", "Table 4")}
    for space, table in r["tables"].items():
        name, paper_table = titles[space]
        cells = [f"this run, {name}"]
        ratios = []
        for e in eps:
            for reg in ("sb", "lb"):
                cells.append(md.fmt(table[reg].get(f"{e:g}")))
            a, b = table["sb"].get(f"{e:g}"), table["lb"].get(f"{e:g}")
            ratios.append(f"{b[0] / a[0]:.1f}×" if a and b and a[0] > 0 else "–")
        rows.append(cells + ratios)
        p = (r.get("paper") or {}).get(space) or {}
        if p:
            cells = [f"{md.paper_label(s['model'])}, {paper_table}"]
            ratios = []
            for e in eps:
                for reg in ("sb", "lb"):
                    cells.append(md.fmt(p.get(reg, {}).get(f"{e:g}")))
                a, b = p.get("sb", {}).get(f"{e:g}"), p.get("lb", {}).get(f"{e:g}")
                ratios.append(f"{b[0] / a[0]:.1f}×" if a and b and a[0] > 0 else "–")
            rows.append(cells + ratios)
    solver = s.get("sharpness_solver")
    data = "the whole training set" if s.get("sharpness_batches") is None else \
        f"the first {s['sharpness_batches']} × {s['eval_batch']} training samples"
    return "\n".join([
        "## 2. Sharpness (Tables 3 and 4)",
        f"Metric 2.1 at the trained weights, over {data}, solver `{solver}`, {_batchnorm(s)}; mean ± std over seeds.",
        "",
        md.table(header, rows),
        "",
        md.figure(r, "sharpness", "sharpness of SB and LB"),
    ])


def _batchnorm(s: dict) -> str:
    if s.get("sharpness_batchnorm", "eval") == "train":
        return "BatchNorm on the statistics of each batch (dropout off)"
    return "eval mode"


def plot(result: dict, path) -> Path:
    """Figure for Tables 3 and 4: SB vs LB sharpness per space and ε (log scale), mean ± std."""
    plt = draw.pyplot()
    tables = result["tables"]
    keys = [(space, eps) for space in ("full", "subspace") for eps in result["epsilons"] if tables.get(space)]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(keys) + 1.5), 3.6))
    for offset, regime in ((-0.18, "sb"), (0.18, "lb")):
        stats = [tables[space][regime].get(f"{eps:g}") for space, eps in keys]
        means = draw.positive([s[0] if s else None for s in stats])
        stds = [s[1] if s else 0.0 for s in stats]
        ax.bar([i + offset for i in range(len(keys))], means, width=0.34, yerr=stds, capsize=4,
               color=draw.COLORS[regime], label=draw.LABELS[regime])
    ax.set_xticks(range(len(keys)), [f"{space}\nε={eps:g}" for space, eps in keys])
    ax.set_yscale("log")
    ax.set_ylabel("sharpness (Metric 2.1)")
    ax.set_title("Sharpness of SB and LB minimizers")
    ax.legend()
    return draw.save(fig, path)
