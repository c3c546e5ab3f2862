"""``torchrun --nproc_per_node 2 -m hessgap train | sharpness | spectrum``: the ranks run one command together
and rank 0 alone writes the run folder and prints."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
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
    landscape = _torchrun("landscape", "run", "--steps", "3", "--out", "land", cwd=tmp_path)
    assert landscape.returncode == 0, landscape.stderr[-3000:]
    assert landscape.stdout.count("lowest training loss") == 1
    from hessgap.cli import main

    assert main(["landscape", str(tmp_path / "run"), "--steps", "3", "--out", str(tmp_path / "land1"), "--quiet",
                 "--threads", "1"]) == 0
    two_ranks, one = (json.loads((tmp_path / name / "results" / "landscape.json").read_text())["loss"]
                      for name in ("land", "land1"))
    np.testing.assert_allclose(np.asarray(two_ranks, dtype=float), np.asarray(one, dtype=float), rtol=1e-6)
