"""The demo's numbers come from the code: replaying the recorded configuration on the platform of the record
prints exactly the recorded lines (benchmarks/regenerate_docs.py writes the record and the docs from it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hessgap.experiments.reference import load_record, platform_stamp, replay, same_platform

RECORD = Path(__file__).resolve().parents[2] / "benchmarks" / "demo_reference.json"


@pytest.fixture(scope="module")
def record():
    return load_record(RECORD)


def _skip_elsewhere(record):
    differences = same_platform(record["platform"], platform_stamp(threads=1))
    if differences:
        pytest.skip("the demo record was made on another platform (" + "; ".join(differences) + "); rerun "
                    "python benchmarks/regenerate_docs.py here to compare on this one")


def _drift(recorded: list[str], printed: list[str]) -> str:
    import difflib

    return "\n".join(difflib.unified_diff(recorded, printed, "recorded", "printed now", lineterm=""))


def test_the_record_names_what_made_it(record):
    assert len(record["commit"]) == 40 and set(record["runs"]) == {"demo", "demo-digits"}
    for run in record["runs"].values():
        assert run["lines"] and run["wall_seconds"] > 0
        assert any(line.startswith("generalization gap") and "±" in line for line in run["lines"])
    gap = next(line for line in record["runs"]["demo"]["lines"] if line.startswith("generalization gap"))
    assert float(gap.split(": ")[1].split(" ± ")[0]) > 2  # the default run shows the paper's gap


def test_the_docs_show_the_recorded_numbers(record):
    root = RECORD.parents[1]
    readme, results = (root / "README.md").read_text(), (root / "benchmarks" / "RESULTS.md").read_text()
    for line in record["runs"]["demo"]["lines"]:
        assert "    " + line in readme and "    " + line in results
    for line in record["runs"]["demo-digits"]["lines"]:
        assert "    " + line in results
    assert record["commit"][:10] in readme and record["commit"][:10] in results


def test_the_check_configuration_prints_the_recorded_lines(record, tmp_path):
    _skip_elsewhere(record)
    printed = replay(record["check"]["settings"], tmp_path / "check")
    assert printed == record["check"]["lines"], "the demo's numbers drifted from the record:\n" + _drift(
        record["check"]["lines"], printed)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HESSGAP_CHECK_DEMO") != "1", reason="the full demo takes minutes: "
                    "HESSGAP_CHECK_DEMO=1 runs it")
def test_the_full_demo_prints_the_recorded_lines(record, tmp_path):
    _skip_elsewhere(record)
    done = subprocess.run([sys.executable, "-m", "hessgap", "demo", "--out", str(tmp_path / "demo"), "--quiet"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stdout.splitlines() if line and not line.startswith(("parametric plot:", "report:"))]
    assert printed == record["runs"]["demo"]["lines"], _drift(record["runs"]["demo"]["lines"], printed)
