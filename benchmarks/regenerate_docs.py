"""Regenerate the figures of README.md and benchmarks/RESULTS.md that the code can recompute, from the code.

    python benchmarks/regenerate_docs.py               # rerun everything, write the record, refresh the docs
    python benchmarks/regenerate_docs.py --docs-only   # refresh the docs from the record as it is

Runs, on one torch thread (the demo's default):

- ``hessgap demo`` (MNIST-1D, the default) and ``hessgap demo --dataset digits``, each in a fresh folder
  and a fresh process, timing wall and CPU time;
- ``hessgap reproduce --preset quick`` (every experiment at CPU scale), keeping the report sections the code
  renders from its results;
- ``benchmarks/training_loop.py`` (loaders, remedies, SB vs LB on digits and MNIST-1D);
- ``check``: a small configuration of the same code path (the demo's experiments on a narrower network for
  fewer epochs), whose printed lines ``tests/experiments/test_demo_reference.py`` replays and compares on
  the same platform.

Writes what they printed to ``benchmarks/demo_reference.json`` stamped with the commit, the platform, torch's
version and CPU instruction set and the thread count, then rewrites the blocks of README.md and RESULTS.md
between ``<!-- regenerated:NAME begin ... -->`` and ``<!-- regenerated:NAME end -->`` (and RESULTS' summary
row of the demo) from that record. Commit the code first: the record names the commit it ran (and says when
the tree had uncommitted changes).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from hessgap._io import read_json, write_json, write_text
from hessgap.experiments.demo import demo_settings
from hessgap.experiments.reference import load_record, platform_stamp, replay

import _timing

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "demo_reference.json"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

#: the runs of `hessgap`: name -> the command's arguments after `hessgap`
DEMOS = {"demo": ["demo"], "demo-digits": ["demo", "--dataset", "digits"]}
QUICK = ["reproduce", "--preset", "quick"]
TRAINING = ["benchmarks/training_loop.py", "--threads", "1", "--epochs", "20", "--gap-epochs", "60"]
#: lines of the demo's output that name files of the run folder, not numbers
_PATH_LINES = ("parametric plot:", "report:")


def check_settings() -> dict:
    """The small configuration the drift test replays: the demo's experiments and data, F1 at width 0.1,
    3 SB / 30 LB epochs, 2 seeds (about ten seconds)."""
    return demo_settings(device="cpu").replace(width=0.1, epochs=3, lb_epochs=30, alphas=5, spectrum_k=2,
                                               trace_probes=4).to_dict()


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def run_command(argv: list[str], shown: str) -> dict:
    """``python <argv>`` in a fresh process: its printed lines (without file paths) and times."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with _timing.stopwatch() as watch:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    wall = watch.seconds
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"`{shown}` failed ({done.returncode}):\n{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line and not line.startswith(_PATH_LINES)]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": shown, "lines": lines, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}


def run_hessgap(argv: list[str], folder: Path) -> dict:
    """``hessgap <argv>`` in a fresh folder, on one torch thread."""
    return run_command(["-m", "hessgap", *argv, "--out", str(folder), "--quiet", "--threads", "1"],
                       "hessgap " + " ".join(argv))


def report_sections(folder: Path) -> dict[str, str]:
    """The report sections of the results in ``folder``, as ``report.md`` renders them, without figures and
    with their headings one level down."""
    from hessgap.experiments.registry import REPORT_ORDER, find

    sections = {}
    for name in REPORT_ORDER:
        path = folder / "results" / f"{name}.json"
        if path.is_file():
            text = find(name).render(read_json(path))
            lines = [line for line in text.splitlines() if not line.startswith("![")]
            sections[name] = "\n".join("#" + line if line.startswith("## ") else line for line in lines).strip()
    return sections


def measure() -> dict:
    """Run the demos and the check configuration; the record."""
    # the files this script writes do not count: they are committed after it ran
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!README.md",
                      ":!benchmarks/RESULTS.md", ":!benchmarks/demo_reference.json"))
    if dirty:
        print("warning: the code has uncommitted changes; the record says so", file=sys.stderr)
    record = {
        "about": "written by benchmarks/regenerate_docs.py; tests/experiments/test_demo_reference.py replays 'check' "
                 "on the same platform and compares its printed lines",
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform_stamp(threads=1),
        "cpu": f"{_timing.cpu_name()}, {os.cpu_count()} CPUs",
        "load_average_before": [round(x, 1) for x in os.getloadavg()],
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="hessgap-docs-") as tmp:
        for name, argv in DEMOS.items():
            print(f"running hessgap {' '.join(argv)} ...", file=sys.stderr)
            record["runs"][name] = run_hessgap(argv, Path(tmp) / name)
            print("\n".join(record["runs"][name]["lines"]), file=sys.stderr)
        print("running hessgap reproduce --preset quick ...", file=sys.stderr)
        quick = run_hessgap(QUICK, Path(tmp) / "quick")
        quick["sections"] = report_sections(Path(tmp) / "quick")
        record["quick"] = quick
        print("running benchmarks/training_loop.py ...", file=sys.stderr)
        record["training"] = run_command(TRAINING, "python " + " ".join(TRAINING))
        print("running the check configuration ...", file=sys.stderr)
        settings = check_settings()
        with _timing.stopwatch() as watch:
            lines = replay(settings, Path(tmp) / "check")
        record["check"] = {"settings": settings, "lines": lines, "seconds": round(watch.seconds, 1)}
    record["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
    return record


# -- the docs' blocks -------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def stamp(record: dict) -> str:
    p = record["platform"]
    commit = record["commit"][:10] + (" with uncommitted changes" if record.get("uncommitted_changes") else "")
    return (f"commit {commit}, {record['date'][:10]}; {p['machine']} {p['system']}, {record.get('cpu', '?')}, torch "
            f"{p['torch']} ({p['cpu_capability']}), {p['threads']} torch thread, load average "
            f"{record['load_average_before'][0]:g} at the start")


def _run_text(run: dict) -> str:
    return "\n".join([
        f"`{run['command']}`: {_duration(run['wall_seconds'])} wall, {_duration(run['cpu_seconds'])} CPU, on a fresh "
        "folder. It printed:", "", *("    " + line for line in run["lines"]),
    ])


def readme_block(record: dict) -> str:
    return "\n".join([
        f"Regenerated by `python benchmarks/regenerate_docs.py` ({stamp(record)}):", "",
        _run_text(record["runs"]["demo"]),
    ])


def results_block(record: dict) -> str:
    check = record["check"]
    return "\n".join([
        f"Regenerated by `python benchmarks/regenerate_docs.py` from `benchmarks/demo_reference.json` "
        f"({stamp(record)}).", "",
        "### The default: MNIST-1D", "", _run_text(record["runs"]["demo"]), "",
        "### `--dataset digits`", "", _run_text(record["runs"]["demo-digits"]), "",
        "### The drift check", "",
        f"`tests/experiments/test_demo_reference.py` replays a smaller configuration of the same code path "
        f"(F1 at width {check['settings']['width']:g}, {check['settings']['epochs']} SB / "
        f"{check['settings']['lb_epochs']} LB epochs, {check['seconds']:g} s here) and fails when its printed lines "
        "differ from the record on the same platform (machine, system, torch version, CPU instruction set, one "
        "thread); elsewhere it skips, naming the difference. `HESSGAP_CHECK_DEMO=1` makes it rerun the full demo "
        "and compare that too.",
    ])


def quick_block(record: dict) -> str:
    quick = record["quick"]
    return "\n".join([
        f"Regenerated by `python benchmarks/regenerate_docs.py` ({stamp(record)}).", "",
        f"`{quick['command']}`: {_duration(quick['wall_seconds'])} wall, {_duration(quick['cpu_seconds'])} CPU, on a "
        "fresh folder.", "", *(f"{text}\n" for text in quick["sections"].values()),
    ]).rstrip()


def training_block(record: dict) -> str:
    run = record["training"]
    return "\n".join([
        f"Regenerated by `python benchmarks/regenerate_docs.py` ({stamp(record)}). `{run['command']}`: "
        f"{_duration(run['wall_seconds'])} wall. It printed:", "", *("    " + line for line in run["lines"]),
    ])


def summary_row(record: dict) -> str:
    def figures(run: dict) -> str:
        found = {}
        for line in run["lines"]:
            if line.startswith("generalization gap"):
                found["gap"] = line.split(": ", 1)[1].replace(" points", "")
            elif line.startswith("sharpness (full space"):
                found["ratio"] = line.rsplit("LB / SB = ", 1)[1].rstrip(")")
        return (f"{_duration(run['wall_seconds'])} wall ({_duration(run['cpu_seconds'])} CPU), gap {found.get('gap')} "
                f"points, LB {found.get('ratio')}× sharper")
    runs = record["runs"]
    return (f"| `hessgap demo` on a 2-core CPU | ≤ 5 min | MNIST-1D (default): {figures(runs['demo'])}; digits: "
            f"{figures(runs['demo-digits'])} | demo |")


def replace_block(text: str, name: str, body: str, path: Path) -> str:
    pattern = re.compile(rf"(<!-- regenerated:{name} begin[^\n]*-->\n)(.*?)(<!-- regenerated:{name} end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no block <!-- regenerated:{name} begin ... --> ... <!-- regenerated:{name} end -->")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)


def refresh_docs(record: dict) -> None:
    readme = replace_block(README.read_text(), "demo", readme_block(record), README)
    write_text(README, readme)
    results = replace_block(RESULTS.read_text(), "demo", results_block(record), RESULTS)
    results = replace_block(results, "quick", quick_block(record), RESULTS)
    results = replace_block(results, "training", training_block(record), RESULTS)
    row = re.compile(r"^\| `hessgap demo` on a 2-core CPU \|.*$", re.M)
    if not row.search(results):
        raise SystemExit(f"{RESULTS} has no summary row starting with '| `hessgap demo` on a 2-core CPU |'")
    results = row.sub(lambda m: summary_row(record), results)
    write_text(RESULTS, results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs-only", action="store_true", help="refresh the docs from the record, run nothing")
    args = parser.parse_args(argv)
    if args.docs_only:
        record = load_record(RECORD)
    else:
        record = measure()
        write_json(RECORD, record)
        print(f"wrote {RECORD}", file=sys.stderr)
    refresh_docs(record)
    print(f"refreshed {README} and {RESULTS} from the record of commit {read_json(RECORD)['commit'][:10]}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
