"""The CMake build: configure against the installed torch, build the op library and its C++ test, run ctest.

Slow (it compiles the kernels from scratch): deselect with ``-m "not slow"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="needs cmake and ctest"),
]


def run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build-cmake"
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    run(["cmake", "-S", ROOT, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         f"-DPython_EXECUTABLE={sys.executable}"], cwd=tmp_path)
    run(["cmake", "--build", build, f"-j{jobs}"], cwd=tmp_path)
    out = run(["ctest", "--test-dir", build, "--output-on-failure"], cwd=tmp_path)
    assert "100% tests passed" in out
    assert "box_ascent_op " in out and "box_ascent_op_baseline_cpu" in out
