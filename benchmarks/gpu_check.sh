#!/usr/bin/env bash
# Build hessgap's CUDA extension on a GPU machine, check every kernel against its CPU/float64 reference and
# time the GPU figures, in one call. Usage (from the repository root): benchmarks/gpu_check.sh [OUT_DIR]
# Needs: python3 with a CUDA build of torch, nvcc, ninja, pybind11, pytest, pytest-benchmark, scipy, matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python -m hessgap.info --json | tee "$out/info.json"
python -c "import sys, hessgap.info as i; sys.exit(0 if i.build_info()['cuda_kernels'] else 'the CUDA kernels were not built')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

echo "== correctness: the CUDA cases, then the whole suite on this machine"
python -m pytest -q -m cuda tests 2>&1 | tee "$out/pytest-cuda.txt"
python -m pytest -q tests 2>&1 | tail -5 | tee "$out/pytest-all.txt"

echo "== timings (CUDA events after warm-up, medians; ratios measured in the same run)"
python benchmarks/box_ascent_ratio.py --device cuda --copies 7 --json "$out/box_ascent.json" | tee "$out/box_ascent.txt"
python benchmarks/hvp_ratio.py --device cuda --k 32 --json "$out/hvp.json" | tee "$out/hvp.txt"
python benchmarks/spectrum_vs_pyhessian.py --device cuda --json "$out/spectrum.json" | tee "$out/spectrum.txt" \
  || echo "spectrum comparison skipped (PyHessian missing?)" | tee -a "$out/spectrum.txt"
echo "results in $out/"
