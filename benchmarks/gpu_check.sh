#!/usr/bin/env bash
# Build hessgap's CUDA extension on a GPU machine, check every kernel against its CPU/float64 reference and
# time the GPU figures, in one call. Usage (from the repository root): benchmarks/gpu_check.sh [OUT_DIR]
# Needs: python3 with a CUDA build of torch, nvcc, ninja, pybind11, pytest, pytest-benchmark, scipy, matplotlib,
# transformers (the graph engine's models).
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

echo "== graph engine: CUDA attention / norm R-ops against their float64 twins, GPT-2 on CUDA against the CPU"
# (already in the -m cuda run above; repeated here on their own so that their lines are easy to find)
python -m pytest -q -m cuda tests/ops/test_attention_rop.py tests/ops/test_norm_rop.py \
  tests/ops/test_hvp_pointwise.py tests/curvature/test_graph_models.py 2>&1 | tee "$out/pytest-graph-cuda.txt"
echo "== graph engine: GPT-2 at T = 1024, k = 16 (HVP working set ≤ 1.3× a gradient's, ≤ 2× its time per"
echo "   vector) and the attention R-op's memory against T (needs transformers)"
python benchmarks/fused_graph_gpu.py --json "$out/graph_gpu.json" | tee "$out/graph_gpu.txt" \
  || echo "graph engine GPU figures skipped (transformers missing?)" | tee -a "$out/graph_gpu.txt"
echo "results in $out/"
