"""The experiments registry: every entry's module has its faces, and the presets, the report and the
command line take their experiment names from it (adding or renaming one is a registry entry and a module)."""

import inspect
import subprocess
import sys

import pytest

from hessgap.errors import HessgapError
from hessgap.experiments import EXPERIMENTS, Settings, preset, registry, report
from hessgap.experiments import presets as presets_module


@pytest.mark.parametrize("entry", registry.REGISTRY, ids=lambda e: e.name)
def test_every_module_runs_renders_and_plots(entry):
    module = entry.load()
    assert callable(module.run) and callable(module.render)
    if entry.reproducible:
        assert list(inspect.signature(module.run).parameters)[:2] == ["folder", "settings"]
        assert callable(module.plot)  # every experiment of the paper draws its figure


def test_names_are_unique_and_the_report_order_follows_the_sections():
    names = [e.name for e in registry.REGISTRY]
    assert len(names) == len(set(names)) and sorted(registry.REPORT_ORDER) == sorted(names)
    sections = [registry.find(n).section for n in registry.REPORT_ORDER]
    assert sections == sorted(sections)
    # the order report.md has always had
    assert registry.REPORT_ORDER == ("train", "gap", "sharpness", "model_sharpness", "parametric", "interpolate",
                                     "sweep", "warmstart", "along_training", "remedies", "spectrum", "model_spectrum",
                                     "correlate", "model_measures")
    assert report.REPORT_ORDER is registry.REPORT_ORDER


def test_presets_select_from_the_registry():
    assert EXPERIMENTS == presets_module.EXPERIMENTS == tuple(e.name for e in registry.REGISTRY if e.reproducible)
    assert Settings().experiments == EXPERIMENTS
    for name in ("quick", "paper"):
        assert set(preset(name).experiments) <= set(EXPERIMENTS)
    with pytest.raises(HessgapError, match="unknown experiment 'train'; choose one of gap"):
        Settings(experiments=("train",))  # a saved-model result is not an experiment to reproduce
    with pytest.raises(HessgapError, match="unknown experiment 'model_spectrum'; choose from gap"):
        registry.get("model_spectrum")


def test_the_registry_is_light_to_import():
    code = ("import sys, hessgap.experiments.registry as r; "
            "heavy = [m for m in ('torch', 'matplotlib', *(f'hessgap.experiments.{e.module}' for e in r.REGISTRY)) "
            "if m in sys.modules]; print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
