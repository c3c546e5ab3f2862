"""benchmarks/llm_scale.py at its smoke-test size: the bfloat16 decoder runs on the graph engine, λmax comes
with its Ritz residual bound, the trace with its interval, and the 7B shape is Llama-2-7B's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
import llm_scale  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_the_7b_shape_is_llama_2_7b():
    shape = llm_scale.SIZES["7b"]
    layers, hidden, inter, vocab = (shape[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                        "vocab_size"))
    n = vocab * hidden * 2 + hidden + layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    assert n == 6_738_415_616


def test_the_script_reports_lambda_max_with_its_bound_and_the_trace_with_its_interval(tmp_path):
    out = tmp_path / "tiny.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llm_scale.py"), "--size", "tiny", "--tokens", "16",
                    "--probes", "4", "--threads", "1", "--json", str(out)], check=True, cwd=ROOT,
                   capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.read_text())
    top = result["lambda_max"]
    assert top["path"] == "fused" and top["converged"] and top["relative_bound"] <= 1e-2
    low, high = result["trace"]["ci"]
    assert low < result["trace"]["value"] < high
    assert result["gradient"]["peak_gb"] > 0 and result["lambda_max"]["peak_gb"] > 0
