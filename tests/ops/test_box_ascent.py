"""torch.ops.hessgap.box_ascent_step against its plain-PyTorch twin, on CPU and (when present) CUDA."""

from __future__ import annotations

import pytest
import torch

from hessgap import _extension
from hessgap.errors import HessgapError
from hessgap.ops.box_ascent import (
    BOX_KINDS,
    DIRECTIONS,
    box_ascent_step,
    box_ascent_step_reference,
    box_radius,
    cpu_kernel_variant,
)

pytestmark = pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available() or not _extension.cuda_kernels_built(),
                                     reason="needs a GPU and the CUDA kernels")
)
DEVICES = ["cpu", CUDA]
DTYPES = [torch.float32, torch.float64]
# odd sizes: a single element, less than one SIMD vector, one short of a power of two, across the
# kernels' chunk boundaries (CPU 32768, CUDA 16384 elements), several dimensions
ODD_SHAPES = [(1,), (7,), (1023,), (65537,), (3, 5, 7), (2, 16385)]
EPSILON = 1e-2


def make_case(shapes, dtype, device, seed=0, momentum=True):
    """x, y (partly outside the box), grad (with exact zeros), params, prev_step for each shape."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)

    x = [randn(s) for s in shapes]
    y = [randn(s, 2 * EPSILON) for s in shapes]
    grad = [randn(s) for s in shapes]
    for g in grad:
        g.view(-1)[::5] = 0  # sign(0) = 0 must stay 0
    params = [torch.full(s, 1e30, dtype=dtype, device=device) for s in shapes]
    prev = [randn(s, EPSILON) for s in shapes] if momentum else None
    return x, y, grad, params, prev


def clone_all(tensors):
    return None if tensors is None else [t.clone() for t in tensors]


def run_both(x, y, grad, params, prev, **options):
    """Runs the op and the reference on separate copies; returns (op result, op tensors, reference ...)."""
    y_ref, params_ref, prev_ref = clone_all(y), clone_all(params), clone_all(prev)
    y_op, params_op, prev_op = clone_all(y), clone_all(params), clone_all(prev)
    out = box_ascent_step(x, y_op, grad, params_op, prev_step=prev_op, **options)
    expected = box_ascent_step_reference(x, y_ref, grad, params_ref, prev_step=prev_ref, **options)
    return out, (y_op, params_op, prev_op), expected, (y_ref, params_ref, prev_ref)


def assert_lists_equal(actual, expected, name):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        # Same operations in the same order without FMA contraction: the step is bit-identical.
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m, i=i: f"{name}[{i}]: {m}")


def assert_reductions_close(out, expected):
    assert out.dtype == torch.float64 and out.shape == (3,) and out.device == expected.device
    torch.testing.assert_close(out[0], expected[0], rtol=1e-12, atol=0)
    assert out[1].item() == expected[1].item()  # a count: exact
    torch.testing.assert_close(out[2], expected[2], rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("box", BOX_KINDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("momentum", [0.0, 0.75])
def test_matches_reference(device, dtype, box, direction, momentum):
    x, y, grad, params, prev = make_case(ODD_SHAPES, dtype, device, momentum=momentum > 0)
    options = dict(step=3e-3, epsilon=EPSILON, box=box, direction=direction, momentum=momentum)
    out, (y_op, p_op, m_op), expected, (y_ref, p_ref, m_ref) = run_both(x, y, grad, params, prev, **options)
    assert_lists_equal(y_op, y_ref, "y")
    assert_lists_equal(p_op, p_ref, "params")
    if momentum > 0:
        assert_lists_equal(m_op, m_ref, "prev_step")
    assert_reductions_close(out, expected)
    # Invariants that do not depend on the reference: y inside the box, params = x + y.
    for xi, yi, pi in zip(x, y_op, p_op):
        assert bool((yi.abs() <= box_radius(xi, EPSILON, box)).all())
        assert torch.equal(pi, xi + yi)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_from_first_principles(device, dtype):
    """The three sums recomputed in float64 from what the op wrote, without the reference twin."""
    x, y, grad, params, prev = make_case([(513,), (40, 41)], dtype, device, seed=3)
    y_before = clone_all(y)
    out = box_ascent_step(x, y, grad, params, step=4e-3, epsilon=EPSILON, box="keskar", direction="gradient",
                          momentum=0.5, prev_step=prev)
    delta = [(a - b).double() for a, b in zip(y, y_before)]  # the step, rounded to the tensors' dtype
    step_sq = sum((d**2).sum() for d in delta)
    faces = sum((yi.abs() >= EPSILON * (xi.abs() + 1)).sum() for xi, yi in zip(x, y))
    predicted = sum((gi.double() * d).sum() for gi, d in zip(grad, delta))
    torch.testing.assert_close(out[0], step_sq, rtol=1e-10, atol=0)
    assert out[1].item() == faces.item()
    torch.testing.assert_close(out[2], predicted, rtol=1e-10, atol=0)
    for m, d in zip(prev, delta):  # the momentum buffer holds the step taken
        torch.testing.assert_close(m.double(), d, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_element_written(device, dtype):
    """y starts far outside the box and params hold a sentinel: no element may keep either."""
    shapes = ODD_SHAPES + [(0,), (5, 0)]
    x, _, grad, params, prev = make_case(shapes, dtype, device, seed=1)
    y = [torch.full(s, 1e30, dtype=dtype, device=device) for s in shapes]
    box_ascent_step(x, y, grad, params, step=1e-3, epsilon=EPSILON, box="absolute", momentum=0.5, prev_step=prev)
    for xi, yi, pi, mi in zip(x, y, params, prev):
        assert bool((yi.abs() <= EPSILON).all())
        assert torch.equal(pi, xi + yi)
        assert bool((mi.abs() > 1e29).all())  # the step from 1e30 back into the box


@pytest.mark.parametrize("device", DEVICES)
def test_prev_step_untouched_without_momentum(device):
    """momentum = 0 is plain projected ascent: a prev_step passed along is neither read nor written."""
    x, y, grad, params, prev = make_case([(100,), (7, 3)], torch.float64, device, seed=10)
    prev_before = clone_all(prev)
    y_ref, p_ref = clone_all(y), clone_all(params)
    box_ascent_step(x, y, grad, params, step=1e-3, epsilon=EPSILON, momentum=0.0, prev_step=prev)
    box_ascent_step_reference(x, y_ref, grad, p_ref, step=1e-3, epsilon=EPSILON)
    assert_lists_equal(prev, prev_before, "prev_step")
    assert_lists_equal(y, y_ref, "y")
    assert_lists_equal(params, p_ref, "params")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tensors(device, dtype):
    """More tensors than one CUDA launch takes (48), of random odd sizes."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(int(n),) for n in torch.randint(1, 3000, (150,), generator=gen)]
    x, y, grad, params, prev = make_case(shapes, dtype, device, seed=2)
    options = dict(step=2e-3, epsilon=EPSILON, box="keskar", direction="sign", momentum=0.9)
    out, (y_op, p_op, m_op), expected, (y_ref, p_ref, m_ref) = run_both(x, y, grad, params, prev, **options)
    assert_lists_equal(y_op, y_ref, "y")
    assert_lists_equal(p_op, p_ref, "params")
    assert_lists_equal(m_op, m_ref, "prev_step")
    assert_reductions_close(out, expected)


def strided_variants(dtype, device):
    """Each layout the op must handle: a name and a function from a contiguous tensor to a view of it."""
    def transposed(t):
        return t.detach().clone().t().contiguous().t()  # same values, column-major strides

    def every_other(t):
        big = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=dtype, device=device)
        big[:, ::2] = t
        return big[:, ::2]

    def offset_by_one(t):  # contiguous but not 16-byte aligned: the CUDA kernel's scalar path
        flat = torch.zeros(t.numel() + 1, dtype=dtype, device=device)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)

    return {"transposed": transposed, "every_other": every_other, "offset_by_one": offset_by_one}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "every_other", "offset_by_one"])
@pytest.mark.parametrize("which", ["all", "y", "params", "x", "grad", "prev_step"])
def test_non_contiguous(device, dtype, layout, which):
    shapes = [(37, 29), (64, 130), (1, 9)]
    x, y, grad, params, prev = make_case(shapes, dtype, device, seed=4)
    make = strided_variants(dtype, device)[layout]
    lists = {"x": x, "y": y, "grad": grad, "params": params, "prev_step": prev}
    for name, tensors in lists.items():
        if which in ("all", name):
            tensors[:] = [make(t) for t in tensors]
    options = dict(step=2e-3, epsilon=EPSILON, box="adaptive", direction="gradient", momentum=0.6)
    y_ref, p_ref, m_ref = clone_all(y), clone_all(params), clone_all(prev)
    out = box_ascent_step(x, y, grad, params, prev_step=prev, **options)
    expected = box_ascent_step_reference(x, y_ref, grad, p_ref, prev_step=m_ref, **options)
    assert_lists_equal(y, y_ref, "y")  # the caller's (strided) tensors hold the results
    assert_lists_equal(params, p_ref, "params")
    assert_lists_equal(prev, m_ref, "prev_step")
    assert_reductions_close(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_uses_the_tensors_directly(device):
    """A shared non-contiguous dense layout (channels-last conv weights) is handled in place."""
    shapes = [(8, 3, 5, 5), (16, 8, 3, 3)]
    x, y, grad, params, prev = make_case(shapes, torch.float32, device, seed=5)
    to_cl = [lambda t: t.contiguous(memory_format=torch.channels_last)]
    x, y, grad, params, prev = ([to_cl[0](t) for t in ts] for ts in (x, y, grad, params, prev))
    y_ptrs = [t.data_ptr() for t in y]
    options = dict(step=2e-3, epsilon=EPSILON, box="keskar", direction="sign", momentum=0.3)
    out, (y_op, p_op, m_op), expected, (y_ref, p_ref, m_ref) = run_both(x, y, grad, params, prev, **options)
    assert_lists_equal(y_op, y_ref, "y")
    assert_lists_equal(p_op, p_ref, "params")
    assert_lists_equal(m_op, m_ref, "prev_step")
    assert_reductions_close(out, expected)
    assert [t.data_ptr() for t in y] == y_ptrs


def test_result_independent_of_thread_count():
    x, y, grad, params, prev = make_case([(200_003,), (70_000,)], torch.float32, "cpu", seed=6)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y_n, p_n, m_n = clone_all(y), clone_all(params), clone_all(prev)
            results.append(box_ascent_step(x, y_n, grad, p_n, step=1e-3, epsilon=EPSILON, momentum=0.5,
                                           prev_step=m_n))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("device", DEVICES)
def test_model_parameters_requiring_grad(device):
    """Params are leaf tensors that require grad: the wrapper writes them under no_grad."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(device)
    params = list(model.parameters())
    x = [p.detach().clone() for p in params]
    y = [torch.zeros_like(p) for p in params]
    grad = [torch.randn_like(p) for p in params]
    out = box_ascent_step(x, y, grad, params, step=1e-3, epsilon=1e-3)
    for p, xi, yi, gi in zip(params, x, y, grad):
        assert p.requires_grad and p.grad_fn is None and p.is_leaf
        assert torch.equal(p.detach(), xi + yi)
        assert torch.equal(yi, 1e-3 * torch.sign(gi).to(yi.dtype))  # well inside ε(|x| + 1)
    assert out[1].item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_matches_cpu(device):
    if device == "cpu":
        pytest.skip("compares the CUDA kernel to the CPU kernel")
    for dtype in DTYPES:
        x, y, grad, params, prev = make_case(ODD_SHAPES, dtype, "cpu", seed=8)
        on_gpu = [None if ts is None else [t.to(device) for t in ts] for ts in (x, y, grad, params, prev)]
        options = dict(step=3e-3, epsilon=EPSILON, box="keskar", direction="sign", momentum=0.5)
        out_cpu = box_ascent_step(x, y, grad, params, prev_step=prev, **options)
        out_gpu = box_ascent_step(*on_gpu[:4], prev_step=on_gpu[4], **options)
        for cpu_list, gpu_list in zip((y, params, prev), (on_gpu[1], on_gpu[3], on_gpu[4])):
            assert_lists_equal([t.cpu() for t in gpu_list], cpu_list, "cuda vs cpu")
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_capture(device):
    """Captured in a CUDA graph and replayed twice: the kernel runs on the capturing (current) stream."""
    if device == "cpu":
        pytest.skip("CUDA graphs")
    x, y, grad, params, prev = make_case([(1000,), (33, 17), (20000,)], torch.float32, device, seed=9)
    options = dict(step=2e-3, epsilon=EPSILON, box="keskar", direction="sign", momentum=0.5)
    y_ref, p_ref, m_ref = clone_all(y), clone_all(params), clone_all(prev)
    scratch = [clone_all(ts) for ts in (y, params, prev)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, on copies
        box_ascent_step(x, scratch[0], grad, scratch[1], prev_step=scratch[2], **options)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = box_ascent_step(x, y, grad, params, prev_step=prev, **options)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for _ in range(2):
        expected = box_ascent_step_reference(x, y_ref, grad, p_ref, prev_step=m_ref, **options)
    assert_lists_equal(y, y_ref, "y")
    assert_lists_equal(params, p_ref, "params")
    assert_lists_equal(prev, m_ref, "prev_step")
    assert_reductions_close(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_opcheck(device, momentum):
    x, y, grad, params, prev = make_case([(7,), (3, 11)], torch.float32, device, momentum=momentum > 0)
    args = (x, y, grad, params, prev, 1e-3, EPSILON, 0, 0, momentum)
    torch.library.opcheck(torch.ops.hessgap.box_ascent_step.default, args)


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        t = [torch.empty(4)]
        out = torch.ops.hessgap.box_ascent_step(t, [torch.empty(4)], t, [torch.empty(4)], None, 1e-3, 1e-2, 0, 0, 0.0)
    assert out.shape == (3,) and out.dtype == torch.float64


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", ImportError("simulated: no hessgap._C"))
    x, y, grad, params, _ = make_case([(3,)], torch.float32, "cpu", momentum=False)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        box_ascent_step(x, y, grad, params, step=1e-3, epsilon=1e-3)


# ---- bad input -------------------------------------------------------------------------------------

def good_args(momentum=0.5):
    x, y, grad, params, prev = make_case([(4,), (2, 3)], torch.float32, "cpu", momentum=True)
    return dict(x=x, y=y, grad=grad, params=params, prev_step=prev, step=1e-3, epsilon=1e-2, box="keskar",
                direction="sign", momentum=momentum)


def call(args):
    args = dict(args)
    return box_ascent_step(args.pop("x"), args.pop("y"), args.pop("grad"), args.pop("params"), **args)


def call_raw(args, box=0, direction=0):
    """Straight through the dispatcher, bypassing the wrapper's own checks."""
    a = dict(args)
    return torch.ops.hessgap.box_ascent_step(a["x"], a["y"], a["grad"], a["params"], a["prev_step"], a["step"],
                                             a["epsilon"], box, direction, a["momentum"])


def test_good_args_run():
    call(good_args())
    call_raw(good_args())


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(step=float("nan")), "step must be a finite number"),
        (lambda a: a.update(step=float("inf")), "step must be a finite number"),
        (lambda a: a.update(epsilon=0.0), r"epsilon .* must be finite and > 0"),
        (lambda a: a.update(epsilon=-1e-3), r"epsilon .* must be finite and > 0"),
        (lambda a: a.update(epsilon=float("inf")), r"epsilon .* must be finite and > 0"),
        (lambda a: a.update(momentum=-0.1), r"momentum must be in \[0, 1\)"),
        (lambda a: a.update(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (lambda a: a.update(prev_step=None), "needs prev_step"),
        (lambda a: a["y"].pop(), "x has 2 tensors but y has 1"),
        (lambda a: a["grad"].append(torch.zeros(1)), "x has 2 tensors but grad has 3"),
        (lambda a: a["prev_step"].pop(), "x has 2 tensors but prev_step has 1"),
        (lambda a: a["params"].__setitem__(1, torch.zeros(3, 2)), r"params\[1\] has shape \[3, 2\]"),
        (lambda a: a["grad"].__setitem__(0, torch.zeros(4, dtype=torch.float64)), r"grad\[0\] has dtype Double"),
        (lambda a: a["prev_step"].__setitem__(0, torch.zeros(4, dtype=torch.float64)),
         r"prev_step\[0\] has dtype Double"),
        (lambda a: a.update(x=[t.half() for t in a["x"]]), "only float32 and float64"),
        (lambda a: a.update(x=[t.int() for t in a["x"]]), "only float32 and float64"),
        (lambda a: a["params"].__setitem__(0, a["y"][0]), r"params\[0\] and y\[0\] share memory"),
        (lambda a: a["params"].__setitem__(0, a["x"][0]), r"params\[0\] and x\[0\] share memory"),
        (lambda a: a["y"].__setitem__(1, a["grad"][1]), r"y\[1\] and grad\[1\] share memory"),
        (lambda a: a["prev_step"].__setitem__(0, a["y"][0]), r"prev_step\[0\] and y\[0\] share memory"),
        (lambda a: a["y"].__setitem__(0, torch.zeros(1).expand(4)), r"y\[0\] has elements that share memory"),
    ],
)
@pytest.mark.parametrize("through", ["wrapper", "dispatcher"])
def test_bad_input(change, match, through):
    args = good_args()
    change(args)
    runner = call if through == "wrapper" else call_raw
    with pytest.raises((RuntimeError, HessgapError), match=match):
        runner(args)


def test_bad_choices():
    with pytest.raises(HessgapError, match="box must be one of"):
        call({**good_args(), "box": "cube"})
    with pytest.raises(HessgapError, match="direction must be one of"):
        call({**good_args(), "direction": "up"})
    with pytest.raises(RuntimeError, match=r"box must be 0 \(keskar\), 1 \(adaptive\) or 2 \(absolute\), got 3"):
        call_raw(good_args(), box=3)
    with pytest.raises(RuntimeError, match=r"direction must be 0 \(sign\) or 1 \(gradient\), got -1"):
        call_raw(good_args(), direction=-1)


def test_empty_lists():
    with pytest.raises(HessgapError, match="got no tensors"):
        box_ascent_step([], [], [], [], step=1e-3, epsilon=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_devices(device):
    if device == "cpu":
        pytest.skip("needs a second device")
    args = good_args()
    args = {k: ([t.to(device) for t in v] if isinstance(v, list) else v) for k, v in args.items()}
    args["grad"][1] = args["grad"][1].cpu()
    with pytest.raises(RuntimeError, match=r"grad\[1\] is on cpu but the other tensors are on cuda"):
        call(args)


BASELINE_SCRIPT = r"""
import torch
from hessgap.ops.box_ascent import box_ascent_step, box_ascent_step_reference
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64):
    for momentum in (0.0, 0.5):
        for box in ("keskar", "adaptive", "absolute"):
            shapes = [(1,), (7,), (1023,), (40000,), (3, 5, 7)]
            x = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            y = [0.02 * torch.randn(s, generator=gen).to(dtype) for s in shapes]
            g = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            m = [0.01 * torch.randn(s, generator=gen).to(dtype) for s in shapes]
            p = [torch.full(s, 1e30, dtype=dtype) for s in shapes]
            y2, p2, m2 = ([t.clone() for t in ts] for ts in (y, p, m))
            kw = dict(step=3e-3, epsilon=1e-2, box=box, direction="sign", momentum=momentum)
            out = box_ascent_step(x, y, g, p, prev_step=m if momentum else None, **kw)
            ref = box_ascent_step_reference(x, y2, g, p2, prev_step=m2 if momentum else None, **kw)
            assert all(torch.equal(a, b) for a, b in zip(y + p + m, y2 + p2 + m2)), (dtype, momentum, box)
            assert out[1] == ref[1] and torch.allclose(out, ref, rtol=1e-12, atol=0), (out, ref)
from hessgap.ops.box_ascent import cpu_kernel_variant
assert cpu_kernel_variant() == "baseline", cpu_kernel_variant()
print("baseline kernel ok")
"""


def test_cpu_kernel_variant():
    """The tests above ran the AVX2 kernel wherever torch itself uses AVX2 or AVX-512."""
    expected = "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "baseline"
    assert cpu_kernel_variant() == expected


def test_baseline_cpu_kernel_matches_reference():
    """The kernel compiled for the baseline instruction set (used where AVX2 is missing or turned off)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline kernel ok" in result.stdout
