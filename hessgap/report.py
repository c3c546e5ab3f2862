"""``report.md`` of a run folder: the run's tables and figures beside the numbers of Keskar et al. 2017.

The report is rebuilt from the folder's ``config.json`` and ``results/*.json`` alone, so it can be
regenerated at any time (``write_report(path)``) and always shows every finished experiment, also when
a later one failed or was interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ._io import read_json, write_text
from .experiments import paper
from .experiments.paper import format_pair

# the paper's order of the experiments (numbers 1-8 in the section titles)
ORDER = ("train", "gap", "sharpness", "model_sharpness", "parametric", "interpolate", "sweep", "warmstart",
         "along_training", "remedies", "spectrum", "model_spectrum")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return format_pair(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return f"{value[0]:.2f} ± {value[1]:.2f}"
    return f"{value:.2f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _figure(result: dict, name: str, caption: str) -> str:
    file = result.get("figures", {}).get(name)
    return f"![{caption}](figures/{file})" if file else ""


def _scale(s: dict) -> str:
    """How the run's network and data differ from the paper's, in a few words."""
    net = s["model"]
    size = "" if s.get("width", 1) == 1 and s.get("depth", 1) == 1 else f" (width ×{s['width']:g}, depth ×{s['depth']:g})"
    return f"{net}{size} on {s['dataset']}"


def _paper_label(model: str) -> str:
    return f"paper: {model} on {paper.PAPER_DATASET.get(model, '?')}"


def render_gap(r: dict) -> str:
    s, summ = r["settings"], r["summary"]
    sb, lb = summ["sb"], summ["lb"]
    rows = [[
        f"this run: {_scale(s)}, {sb['runs']}+{lb['runs']} runs",
        _pct(sb["train_acc"]), _pct(lb["train_acc"]), _pct(sb["test_acc"]), _pct(lb["test_acc"]), _pct(summ["test_gap"]),
    ]]
    p = r.get("paper") or {}
    if p:
        gap = p["test_sb"][0] - p["test_lb"][0]
        rows.append([_paper_label(s["model"]), _pct(p["train_sb"]), _pct(p["train_lb"]), _pct(p["test_sb"]),
                     _pct(p["test_lb"]), f"{gap:.2f}"])
    out = [
        "## 1. Generalization gap (Table 2)",
        f"SB batch {sb['batch_size']}, LB batch {lb['batch_size']}; accuracy in % (mean ± std over seeds, eval mode, "
        "whole splits).",
        "",
        _table(["", "train SB", "train LB", "test SB", "test LB", "gap (test SB − LB)"], rows),
        "",
        f"‖x_SB − x0‖ / ‖x_LB − x0‖: {_fmt(summ.get('distance_ratio'))} (paper: 3 to 10).",
    ]
    for regime in ("sb", "lb"):
        if summ[regime]["diverged"]:
            out.append(f"**{regime.upper()} diverged** for seeds {summ[regime]['diverged']} (left out of the statistics).")
    per_seed = [[row["seed"], row["regime"].upper(), row["batch_size"], row["epochs"],
                 _pct(row.get("train_acc")), _pct(row.get("test_acc")), _fmt(row.get("train_loss")),
                 _fmt(row.get("distance_from_start")),
                 f"diverged at epoch {row['diverged']}" if row.get("diverged") is not None else "ok"]
                for row in r["rows"]]
    out += ["", "<details><summary>per run</summary>", "",
            _table(["seed", "regime", "batch", "epochs", "train acc", "test acc", "train loss", "‖x − x0‖", "status"],
                   per_seed), "", "</details>", "", _figure(r, "gap", "accuracy of SB and LB")]
    return "\n".join(out)


def render_sharpness(r: dict) -> str:
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
                cells.append(_fmt(table[reg].get(f"{e:g}")))
            a, b = table["sb"].get(f"{e:g}"), table["lb"].get(f"{e:g}")
            ratios.append(f"{b[0] / a[0]:.1f}×" if a and b and a[0] > 0 else "–")
        rows.append(cells + ratios)
        p = (r.get("paper") or {}).get(space) or {}
        if p:
            cells = [f"{_paper_label(s['model'])}, {paper_table}"]
            ratios = []
            for e in eps:
                for reg in ("sb", "lb"):
                    cells.append(_fmt(p.get(reg, {}).get(f"{e:g}")))
                a, b = p.get("sb", {}).get(f"{e:g}"), p.get("lb", {}).get(f"{e:g}")
                ratios.append(f"{b[0] / a[0]:.1f}×" if a and b and a[0] > 0 else "–")
            rows.append(cells + ratios)
    solver = s.get("sharpness_solver")
    data = "the whole training set" if s.get("sharpness_batches") is None else \
        f"the first {s['sharpness_batches']} × {s['eval_batch']} training samples"
    return "\n".join([
        "## 2. Sharpness (Tables 3 and 4)",
        f"Metric 2.1 at the trained weights, over {data}, solver `{solver}`, eval mode; mean ± std over seeds.",
        "",
        _table(header, rows),
        "",
        _figure(r, "sharpness", "sharpness of SB and LB"),
    ])


def render_model_sharpness(r: dict) -> str:
    rows = [[m["space"], _fmt(m["epsilon"]), _fmt(m["value"]), _fmt(m["loss"]), _fmt(m.get("max_loss")),
             m.get("solver", "–"), _fmt(m.get("seconds"), 3)] for m in r["measurements"]]
    return "\n".join([
        f"## Sharpness of {r['model']}",
        f"Data: {r.get('data', '–')}.",
        "",
        _table(["space", "ε", "sharpness", "f(x)", "max f", "solver", "seconds"], rows),
    ])


def render_spectrum(r: dict) -> str:
    rows = []
    for regime, m in r["models"].items():
        if m.get("eigenvalues"):
            rows.append([regime.upper(), ", ".join(f"{v:.4g}" for v in m["eigenvalues"]), _fmt(m.get("trace")),
                         _fmt(m["sharpness"]), _fmt(m.get("loss")), m.get("hvps", "–")])
        else:
            rows.append([regime.upper(), f"diverged at epoch {m.get('diverged')}", "–", "–", "–", "–"])
    ratio = r.get("top_ratio_lb_sb")
    return "\n".join([
        "## 8. Top Hessian eigenvalues beside sharpness",
        f"Top {r['k']} eigenvalues of the training-loss Hessian (Lanczos) and Metric 2.1 (full space, ε={r['epsilon']:g}).",
        "",
        _table(["", "top eigenvalues", "trace (Hutchinson)", f"sharpness ε={r['epsilon']:g}", "f(x)", "HVPs (Lanczos)"], rows),
        "",
        f"λ_max(LB) / λ_max(SB) = {_fmt(ratio, 3)}. Paper: {r.get('paper', '')}",
        "",
        _figure(r, "spectrum", "top eigenvalues"),
    ])


def render_model_spectrum(r: dict) -> str:
    out = [f"## Hessian spectrum of {r['model']}", f"Data: {r.get('data', '–')}.", ""]
    if r.get("eigenvalues") is not None:
        out.append(f"Top {len(r['eigenvalues'])} eigenvalues: " + ", ".join(f"{v:.5g}" for v in r["eigenvalues"]))
    if r.get("trace") is not None:
        out.append(f"\nTrace (Hutchinson): {_fmt(r['trace'].get('value'))}")
    if r.get("figures", {}).get("density"):
        out += ["", _figure(r, "density", "spectral density")]
    return "\n".join(out)


def _curve_rows(curve: dict, picks=(-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)) -> list[list]:
    rows = []
    alphas = curve["alpha"]
    for target in picks:
        if not alphas or target < min(alphas) - 1e-9 or target > max(alphas) + 1e-9:
            continue
        i = min(range(len(alphas)), key=lambda j: abs(alphas[j] - target))
        clamped = curve.get("clamped_variances", [0] * len(alphas))[i]
        rows.append([f"{alphas[i]:.3g}", _fmt(curve["train_loss"][i]), _fmt(curve["test_loss"][i]),
                     _pct(curve["train_acc"][i]), _pct(curve["test_acc"][i]), clamped])
    return rows


def render_parametric(r: dict) -> str:
    out = ["## 3. Parametric plots (Figures 3 and 7)",
           f"From x_SB (α = 0, {r['models']['sb']}) to x_LB (α = 1, {r['models']['lb']}); BatchNorm: {r['batchnorm']}.",
           f"Paper: {r.get('paper', '')}", ""]
    for name, curve in r["curves"].items():
        out += [f"**{name} path**", "", _table(["α", "train loss", "test loss", "train acc", "test acc", "clamped BN variances"],
                                                   _curve_rows(curve)), ""]
    out.append(_figure(r, "parametric", "loss and accuracy along the path"))
    return "\n".join(out)


def render_along_training(r: dict) -> str:
    out = ["## 6. Sharpness along training (Figure 6)",
           f"Metric 2.1 (full space, ε={r['epsilon']:g}) measured during training. Paper: {r.get('paper', '')}", ""]
    rows = []
    for regime, points in r["curves"].items():
        for p in points:
            rows.append([regime.upper(), p["epoch"], _fmt(p["train_loss"]), _fmt(p["sharpness"])])
    out += ["<details><summary>every measurement</summary>", "", _table(["", "epoch", "train loss", "sharpness"], rows),
            "", "</details>", ""]
    ratio = r.get("distance_ratio")
    low, high = r.get("paper_distance_ratio", (3, 10))
    out.append(f"‖x_SB − x0‖ / ‖x_LB − x0‖ at the end: {_fmt(ratio, 3)} (paper: {low:g} to {high:g}).")
    out += ["", _figure(r, "along_training", "sharpness vs training loss"), _figure(r, "history", "training curves")]
    return "\n".join(out)


def render_sweep(r: dict) -> str:
    eps = r["epsilons"]
    rows = []
    for row in r["rows"]:
        if row.get("diverged") is not None:
            rows.append([row["batch_size"], f"diverged at epoch {row['diverged']}", "–"] + ["–"] * len(eps))
        else:
            rows.append([row["batch_size"], _pct(row["train_acc"]), _pct(row["test_acc"])]
                        + [_fmt(row["sharpness"].get(f"{e:g}")) for e in eps])
    return "\n".join([
        "## 4. Batch-size sweep (Figure 4)", f"Paper: {r.get('paper', '')}", "",
        _table(["batch", "train acc", "test acc"] + [f"sharpness ε={e:g}" for e in eps], rows), "",
        _figure(r, "sweep", "accuracy and sharpness vs batch size"),
    ])


def render_warmstart(r: dict) -> str:
    eps = r["epsilons"]
    rows = []
    for row in r["rows"]:
        if row.get("skipped") or row.get("diverged") is not None:
            rows.append([row["warm_epoch"], row.get("skipped") or f"diverged at epoch {row['diverged']}", "–"] + ["–"] * len(eps))
        else:
            rows.append([row["warm_epoch"], _pct(row["train_acc"]), _pct(row["test_acc"])]
                        + [_fmt(row["sharpness"].get(f"{e:g}")) for e in eps])
    sb = r.get("sb_final") or {}
    return "\n".join([
        "## 5. Warm-started large batch (Figure 5)",
        f"LB (batch {r['lb_batch']}) trained from the SB iterate after each listed epoch. Paper: {r.get('paper', '')}",
        "",
        _table(["SB epochs", "train acc", "test acc"] + [f"sharpness ε={e:g}" for e in eps], rows), "",
        f"The SB run itself ends at test accuracy {_pct(sb.get('test_acc'))} %.", "",
        _figure(r, "warmstart", "warm-started LB"),
    ])


def render_remedies(r: dict) -> str:
    rows = []
    for row in r["rows"]:
        status = ", ".join(f"seed {d['seed']} diverged at epoch {d['epoch']}" for d in row.get("diverged", [])) or ""
        paper_cells = [_fmt(row.get("paper_test_lb")), _fmt(row.get("paper_sharpness_lb"))]
        if row.get("paper_note"):
            paper_cells = [row["paper_note"], "–"]
        rows.append([row["name"], _pct(row["train_acc"]), _pct(row["test_acc"]), _fmt(row["sharpness"])]
                    + paper_cells + [status])
    extra = ""
    if r.get("dynamic_schedule"):
        start, final, growth = r["dynamic_schedule"]
        extra = f"Dynamic sampling: batch {start} grown ×{growth:.3g} per epoch up to {final}."
    return "\n".join([
        "## 7. Remedies (Appendix E)",
        f"Sharpness: Metric 2.1, full space, ε={r['epsilon']:g}. Paper columns: the paper's LB numbers with the remedy.",
        "",
        _table(["", "train acc", "test acc", "sharpness", "paper test LB", "paper sharpness LB", "notes"], rows),
        "", extra, "", _figure(r, "remedies", "remedies"),
    ])


def render_train(r: dict) -> str:
    final = r.get("final") or {}
    rows = [[f"{k} (%)", _pct(100 * v)] if k.endswith("_acc") and v is not None else [k, _fmt(v)]
            for k, v in final.items()]
    out = [f"## Training run {r.get('model', '')}", ""]
    if r.get("diverged") is not None:
        out.append(f"**Diverged at epoch {r['diverged']}** (non-finite training loss); checkpoints kept.")
    out += [_table(["last epoch", "value"], rows), "", _figure(r, "history", "training curves")]
    return "\n".join(out)


RENDERERS: dict[str, Callable[[dict], str]] = {
    "train": render_train,
    "gap": render_gap,
    "sharpness": render_sharpness,
    "model_sharpness": render_model_sharpness,
    "spectrum": render_spectrum,
    "model_spectrum": render_model_spectrum,
    "parametric": render_parametric,
    "interpolate": render_parametric,
    "along_training": render_along_training,
    "sweep": render_sweep,
    "warmstart": render_warmstart,
    "remedies": render_remedies,
}


def _settings_block(config: dict) -> str:
    s = config.get("settings", {})
    keys = ["model", "dataset", "width", "depth", "optimizer", "lr", "epochs", "patience", "sb_batch", "lb_batch",
            "lb_fraction", "seed", "seeds", "epsilons", "subspace_dim", "sharpness_solver", "device"]
    rows = [[k, json.dumps(s[k]) if isinstance(s[k], (list, dict)) else s[k]] for k in keys if k in s]
    return _table(["setting", "value"], rows) if rows else ""


def render(folder, errors: dict | None = None) -> str:
    """The report text of a run folder; ``errors`` (experiment name → message) are listed at the end."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = read_json(config_path) if config_path.exists() else {}
    results = {}
    results_dir = folder / "results"
    if results_dir.exists():
        for path in sorted(results_dir.glob("*.json")):
            if not path.name.endswith(".parts.json"):
                results[path.stem] = read_json(path)
    parts = [
        f"# hessgap report: `{config.get('command', '?')}`",
        "",
        f"Beside the numbers of {paper.CITATION}. The paper trained full-size networks on MNIST, TIMIT and CIFAR "
        "for about 100 epochs; a run at another scale or on other data is expected to show the same direction "
        "(LB sharper, lower test accuracy), not the same values.",
        "",
        f"hessgap {config.get('hessgap', '?')}, torch {config.get('torch', '?')}, {config.get('machine', '?')}; "
        f"updated {config.get('updated', '?')}.",
        "",
        _settings_block(config),
    ]
    for name in sorted(results, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        renderer = RENDERERS.get(results[name].get("experiment", name))
        if renderer is not None:
            parts += ["", renderer(results[name])]
    errors = errors or {}
    for name, message in errors.items():
        parts += ["", f"**{name} failed**: {message}"]
    missing = [n for n in config.get("settings", {}).get("experiments", []) if n not in results and n not in errors]
    if missing and config.get("command") in ("reproduce", "demo"):
        parts += ["", f"Not finished yet: {', '.join(missing)} (rerun the same command to resume)."]
    return "\n".join(parts).rstrip() + "\n"


def write_report(folder, errors: dict | None = None) -> Path:
    """Write ``report.md`` in ``folder`` from its config and results (and the failures of this call);
    returns its path."""
    return write_text(Path(folder) / "report.md", render(folder, errors))
