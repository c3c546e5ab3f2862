"""pytest-benchmark: one box-ascent step, fused op against the unfused twins, on 2.4M float32 parameters.

    pytest benchmarks/bench_box_ascent.py --benchmark-only --benchmark-group-by=param:momentum

For the >= 10M-parameter side-by-side figures (and CUDA bandwidth) use benchmarks/box_ascent_ratio.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from box_ascent_ratio import IMPLEMENTATIONS, make_state  # noqa: E402

from hessgap import _extension  # noqa: E402

pytestmark = pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")

# A small CNN's parameter shapes (conv 3-64-128-256, two dense layers): about 2.4M parameters.
SHAPES = [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (128,), (256, 128, 3, 3), (256,), (512, 4096), (512,), (10, 512), (10,)]


@pytest.mark.parametrize("momentum", [0.0, 0.75])
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_box_ascent_step(benchmark, implementation, momentum):
    x, y, grad, params, prev = make_state(SHAPES, torch.float32, "cpu", 1e-3, momentum)
    fn = IMPLEMENTATIONS[implementation]
    options = dict(step=1e-3, epsilon=1e-3, box="keskar", direction="sign", momentum=momentum)
    out = benchmark(lambda: fn(x, y, grad, params, prev_step=prev, **options))
    assert out.shape == (3,)
