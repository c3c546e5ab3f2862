"""The model zoo's table: one markdown row per configuration from ``benchmarks/zoo.py``'s records, the targets
it is held to, and the section of ``benchmarks/RESULTS.md`` it is written into."""

from __future__ import annotations

import os
import statistics

import _timing

HEADING = "## Model zoo"
#: per vector at k = 16 against the retained graph: never slower, median ≤ 0.85; token transformers ≤ 1.0;
#: against curvlinops ≤ 0.6 where it runs
TARGETS = {"max_retained": 1.0, "median_retained": 0.85, "max_curvlinops": 0.6, "max_token": 1.0}


def _ratio(record: dict, other: str) -> float | None:
    costs = record.get("in_gradients", {})
    if "hessgap" in costs and other in costs:
        return costs["hessgap"] / costs[other]
    return None


def _mib(entry: dict | None) -> str:
    if not entry:
        return "–"
    if "error" in entry:
        return "fails"
    value = entry.get("cuda_bytes", entry["bytes"])
    return f"{value / 2**20:.0f}"


def _error_cell(check: dict) -> str:
    if not check or "error_reference" not in check:
        return "–"
    cell = f"{check['error_reference']:.1e}"
    if check.get("error_generic") is not None:
        cell += f" (generic {check['error_generic']:.1e})"
    return cell + ("" if check.get("exact") else " **not exact**")


def _note(notes: list[str], text: str) -> int:
    """The footnote number of ``text``, added once however many rows cite it."""
    if text not in notes:
        notes.append(text)
    return notes.index(text) + 1


def _cost(record: dict, method: str, notes: list[str]) -> str:
    costs = record.get("in_gradients", {})
    if method in costs:
        return f"{costs[method]:.2f}"
    error = record.get("timing", {}).get("errors", {}).get(method) or record.get("errors", {}).get(f"{method}_setup")
    if error:
        return f"fails [{_note(notes, method.replace('_', ' ') + ' raised ' + error)}]"
    return "–"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def _row(record: dict, notes: list[str]) -> str:
    name = record["config"]
    if "error" in record and "n" not in record:
        return f"| {name} | | | fails [{_note(notes, f'{name}: ' + record['error'])}] |" + " |" * 9
    path = record.get("path") or "–"
    if record.get("status") == "running":
        rounds = len(record.get("timing", {}).get("seconds_per_round", {}).get("gradient", []))
        path += f" [{_note(notes, f'{name}: the run stopped while measuring it; what it had measured is shown ({rounds} timing round(s))')}]"
    if record.get("fallback_reason"):
        path += f" [{_note(notes, f'{name} falls back: ' + record['fallback_reason'])}]"
    for stage, error in record.get("errors", {}).items():
        if not stage.endswith("_setup"):
            path += f" [{_note(notes, f'{name}, {stage}: {error}')}]"
    check = record.get("check") or {}
    computes = check.get("computes_in", "–")
    if check.get("path") and check.get("path") != record.get("path"):
        computes += f" (float64 copy: {check['path']})"
    memory = record.get("memory", {})
    retained, curvlinops = _ratio(record, "retained_graph"), _ratio(record, "curvlinops")
    capture = record.get("capture_seconds")
    return (f"| {name} | {record.get('shape', '')} | {_count(record.get('n', 0))} | {path} | {computes} | "
            f"{_error_cell(check)} | {'–' if capture is None else f'{capture:.1f}'} | "
            f"{_cost(record, 'hessgap', notes)} | {_cost(record, 'retained_graph', notes)} | "
            f"{_cost(record, 'curvlinops', notes)} | {'–' if retained is None else f'**{retained:.2f}**'} | "
            f"{'–' if curvlinops is None else f'{curvlinops:.2f}'} | "
            f"{' / '.join(_mib(memory.get(m)) for m in ('hessgap', 'retained_graph', 'curvlinops'))} |")


def summary(records: list[dict]) -> list[str]:
    """The targets and where the zoo stands against each."""
    measured = [r for r in records if "n" in r]
    fused = [r["config"] for r in measured if r.get("path") == "fused"]
    exact = [r["config"] for r in measured if (r.get("check") or {}).get("exact")]
    retained = {r["config"]: _ratio(r, "retained_graph") for r in measured if _ratio(r, "retained_graph")}
    curvlinops = {r["config"]: _ratio(r, "curvlinops") for r in measured if _ratio(r, "curvlinops")}
    token = {r["config"]: retained[r["config"]] for r in measured if r.get("family") == "token" and r["config"] in retained}

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    def worst(ratios: dict) -> str:
        name = max(ratios, key=ratios.get)
        return f"{ratios[name]:.2f} ({name})"

    lines = [f"- fused path: {len(fused)} of {len(measured)} configurations "
             f"({verdict(len(fused) == len(measured))}; generic: "
             f"{', '.join(r['config'] for r in measured if r.get('path') != 'fused') or 'none'})",
             f"- exact: {len(exact)} of {len(measured)} ({verdict(len(exact) == len(measured))})"]
    if retained:
        slower = [name for name, value in retained.items() if value > TARGETS["max_retained"]]
        median = statistics.median(retained.values())
        lines += [f"- hessgap / retained graph per vector: median {median:.2f} (target ≤ {TARGETS['median_retained']}: "
                  f"{verdict(median <= TARGETS['median_retained'])}), largest {worst(retained)} (target ≤ 1 on every "
                  f"model: {verdict(not slower)}{'; slower on ' + ', '.join(slower) if slower else ''})"]
    if token:
        lines.append(f"- token transformers / retained graph: largest {worst(token)} (target ≤ {TARGETS['max_token']}: "
                     f"{verdict(max(token.values()) <= TARGETS['max_token'])})")
    if curvlinops:
        lines.append(f"- hessgap / curvlinops where it runs ({len(curvlinops)} configurations): largest "
                     f"{worst(curvlinops)}, median {statistics.median(curvlinops.values()):.2f} (target ≤ "
                     f"{TARGETS['max_curvlinops']}: {verdict(max(curvlinops.values()) <= TARGETS['max_curvlinops'])})")
    return lines


def render(report: dict) -> str:
    """The markdown of the zoo: what was run where, the table, the targets and the footnotes."""
    meta = report.get("meta", {})
    records = list(report["configs"].values())
    notes: list[str] = []
    rows = [_row(r, notes) for r in records]
    k = meta.get("k", 16)
    lines = []
    if meta:
        versions = ", ".join(f"{name} {v}" for name, v in meta.get("versions", {}).items() if v)
        lines += [f"Measured {meta.get('date')} at commit {meta.get('commit')} with `{meta.get('command')}`, on "
                  f"{_timing.describe_machine(meta['machine'])}; {versions}. Size `{meta.get('size')}`, k = {k}, "
                  f"{meta.get('rounds')} interleaved rounds (medians), {meta.get('clock')} clock; retained graph timed on "
                  f"{meta.get('baseline_vectors')} vectors, curvlinops in blocks of {meta.get('curvlinops_block')} "
                  "columns."]
        later = [r for r in report.get("runs", [])[1:]]
        if later:
            lines[-1] += " Rows measured again or added by later runs: " + "; ".join(
                f"`{r['command']}` ({r['date']}, commit {r['commit']})" for r in later) + "."
        lines.append("")
    lines += ["| config | timing batch | n | path | computes in | rel. error vs float64 reference | capture s | "
              "hessgap | retained graph | curvlinops | hessgap / retained | hessgap / curvlinops | "
              "peak MiB: hessgap / retained / curvlinops |",
              "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|", *rows, ""]
    lines += [f"hessgap, retained graph, curvlinops: per vector at k = {k}, in gradients (one forward + backward of "
              "the same batch). Peak memory: resident set above the model and data, of one product of k vectors in "
              "a fresh process.", "", *summary(records)]
    if notes:
        lines += ["", *(f"{i}. {note}" for i, note in enumerate(notes, 1))]
    return "\n".join(lines)


def markers(size: str) -> tuple[str, str]:
    return (f"<!-- zoo {size} begin: benchmarks/zoo.py --size {size} --results writes this block -->",
            f"<!-- zoo {size} end -->")


def write_results(path: str, table: str, size: str) -> None:
    """Put ``table`` into RESULTS.md's "Model zoo" section, in the block of its size (between the block's markers),
    adding the section or the block at the end of the file when absent."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    begin, end = markers(size)
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        heading = "" if HEADING in text else f"\n{HEADING}\n"
        text = text.rstrip("\n") + f"\n{heading}\n### `--size {size}`\n\n{block}\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
