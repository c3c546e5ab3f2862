"""``torchrun --nproc_per_node 2 -m hessgap train | sharpness | spectrum``: the ranks run one command together
and rank 0 alone writes the run folder and prints."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun is not installed")


def _torchrun(*args, cwd):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "hessgap", *args, "--threads", "1",
                           "--quiet"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_train_then_sharpness_and_spectrum_on_two_ranks(tmp_path):
    trained = _torchrun("train", "--model", "F1", "--width", "0.25", "--epochs", "2", "--batch-size", "64",
                        "--out", "run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stdout.count("after epoch 2") == 1  # one summary: rank 0's
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt"]
    measured = _torchrun("sharpness", "run", "--epsilon", "1e-3", "--out", "sharp", cwd=tmp_path)
    assert measured.returncode == 0, measured.stderr[-3000:]
    result = json.loads((tmp_path / "sharp" / "results" / "model_sharpness.json").read_text())
    assert result["measurements"][0]["value"] > 0
    spectrum = _torchrun("spectrum", "run", "--k", "2", "--out", "spec", cwd=tmp_path)
    assert spectrum.returncode == 0, spectrum.stderr[-3000:]
    assert len(json.loads((tmp_path / "spec" / "results" / "model_spectrum.json").read_text())["eigenvalues"]) == 2
