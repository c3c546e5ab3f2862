"""Side by side: the fused box-ascent op against the same step written with unfused PyTorch ops.

Usage:
    python benchmarks/box_ascent_ratio.py                       # CPU, VGG-16 (CIFAR) shapes, 15.0M float32
    python benchmarks/box_ascent_ratio.py --device cuda         # CUDA events; bandwidth vs a D2D copy
    python benchmarks/box_ascent_ratio.py --momentum 0.75 --dtype float64 --json out.json

Three implementations of one step run in interleaved rounds (so machine noise hits all alike):
``fused`` (torch.ops.hessgap.box_ascent_step), ``reference`` (the plain-PyTorch twin, one loop over
tensors) and ``foreach`` (the same step with torch._foreach_* multi-tensor ops). Reported: median time
per step and the fused op's speed-up. On CUDA, also the fused op's effective bandwidth (bytes read and
written by one step / time) against a device-to-device copy of the same number of bytes in the same run,
both timed with CUDA events after warm-up, replayed from CUDA graphs (kernel time without Python's
launch cost; eager figures are printed too).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

from hessgap.ops.box_ascent import box_ascent_step, box_ascent_step_reference, cpu_kernel_variant

import _timing


def vgg16_cifar_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of VGG-16 for 32x32 inputs (conv weights and biases, a 512-512-10 head): 14.7M."""
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    shapes, c_in = [], 3
    for c_out in widths:
        shapes += [(c_out, c_in, 3, 3), (c_out,)]
        c_in = c_out
    return shapes + [(512, 512), (512,), (10, 512), (10,)]


def mlp_shapes() -> list[tuple[int, ...]]:
    """A wide MLP on 784 inputs (layers of 2048), 14.2M parameters."""
    dims = [784, 2048, 2048, 2048, 2048, 10]
    return [s for d_in, d_out in zip(dims, dims[1:]) for s in ((d_out, d_in), (d_out,))]


MODELS = {"vgg16": vgg16_cifar_shapes, "mlp": mlp_shapes}


@torch.no_grad()
def box_ascent_step_foreach(x, y, grad, params, *, step, epsilon, box="keskar", direction="sign", momentum=0.0,
                            prev_step=None):
    """The step with torch._foreach_* ops (keskar box, sign direction): the best unfused multi-tensor form."""
    assert box == "keskar" and direction == "sign"
    r = torch._foreach_abs(x)
    torch._foreach_add_(r, 1.0)
    torch._foreach_mul_(r, epsilon)
    neg_r = torch._foreach_neg(r)
    z = torch._foreach_sign(grad)
    torch._foreach_mul_(z, step)
    torch._foreach_add_(z, y)
    torch._foreach_minimum_(z, r)
    torch._foreach_maximum_(z, neg_r)
    if momentum > 0:
        pulled = torch._foreach_sub(z, y)
        torch._foreach_mul_(pulled, 1 - momentum)
        torch._foreach_add_(pulled, y)
        torch._foreach_add_(pulled, torch._foreach_mul(prev_step, momentum))
        torch._foreach_minimum_(pulled, r)
        torch._foreach_maximum_(pulled, neg_r)
        z = pulled
    delta = torch._foreach_sub(z, y)
    step_sq = torch.stack(torch._foreach_norm(delta, 2, dtype=torch.float64)).square().sum()
    on_faces = sum((zi.abs() >= ri).sum() for zi, ri in zip(z, r)).double()
    predicted = torch.stack([(gi.double() * di.double()).sum() for gi, di in zip(grad, delta)]).sum()
    if momentum > 0:
        torch._foreach_copy_(prev_step, delta)
    torch._foreach_copy_(y, z)
    torch._foreach_copy_(params, torch._foreach_add(x, z))
    return torch.stack([step_sq, on_faces, predicted])


IMPLEMENTATIONS = {
    "fused": box_ascent_step,
    "reference": box_ascent_step_reference,
    "foreach": box_ascent_step_foreach,
}


def make_state(shapes, dtype, device, epsilon, momentum):
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]
    y = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
    grad = [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]
    params = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
    prev = [torch.zeros(s, dtype=dtype, device=device) for s in shapes] if momentum > 0 else None
    return x, y, grad, params, prev


def bytes_per_step(numel: int, itemsize: int, momentum: float) -> int:
    """Bytes one fused step must move: read x, y, grad (and prev_step), write y, params (and prev_step)."""
    return numel * itemsize * (7 if momentum > 0 else 5)


def check_agreement(shapes, dtype, device, options):
    """All three implementations give the same step (guards the timings against comparing different work)."""
    outs = {}
    for name, fn in IMPLEMENTATIONS.items():
        x, y, grad, params, prev = make_state(shapes, dtype, device, options["epsilon"], options["momentum"])
        outs[name] = (fn(x, y, grad, params, prev_step=prev, **options), y, params)
    base_out, base_y, base_p = outs["reference"]
    for name, (out, y, params) in outs.items():
        torch.testing.assert_close(out, base_out, rtol=1e-6, atol=0, msg=f"{name} reductions differ")
        for a, b in zip(y + params, base_y + base_p):
            torch.testing.assert_close(a, b, msg=f"{name} tensors differ")


def time_cuda(fn, repeats):
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def cuda_graph_replay(fn):
    """``fn`` captured in a CUDA graph, as a replay function (kernel time without Python's launch cost),
    or None when the capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as exc:  # report and go on with eager timings
        print(f"  (CUDA graph capture failed: {exc}; eager timings only)")
        return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--model", default="vgg16", choices=sorted(MODELS))
    parser.add_argument("--copies", type=int, default=1,
                        help="repeat the model's tensors this many times (7 copies of vgg16 = 103M parameters)")
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per implementation and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    _timing.set_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.copies < 1:
        parser.error("--copies must be at least 1")
    shapes = MODELS[args.model]() * args.copies
    numel = sum(torch.Size(s).numel() for s in shapes)
    options = dict(step=1e-3, epsilon=1e-3, box="keskar", direction="sign", momentum=args.momentum)
    check_agreement(shapes, dtype, device, options)

    def timer(fn, repeats):  # CUDA events on a GPU (the kernels' own time), the wall clock on a CPU
        return time_cuda(fn, repeats) if device.type == "cuda" else _timing.repeat(fn, repeats, _timing.Clock("wall"))
    state = make_state(shapes, dtype, device, options["epsilon"], options["momentum"])
    x, y, grad, params, prev = state
    calls = {name: (lambda fn=fn: fn(x, y, grad, params, prev_step=prev, **options)) for name, fn in IMPLEMENTATIONS.items()}
    moved = bytes_per_step(numel, x[0].element_size(), args.momentum)
    if device.type == "cuda":
        # A copy that reads and writes as many bytes as one fused step: moved / 2 read, moved / 2 written.
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        calls["d2d_copy"] = lambda: dst.copy_(src)
        # The same two in CUDA graphs: the bandwidth comparison without Python's per-call launch cost.
        for name in ("fused", "d2d_copy"):
            replay = cuda_graph_replay(calls[name])
            if replay is not None:
                calls[f"{name}_graph"] = replay

    for fn in calls.values():
        for _ in range(args.warmup):
            fn()
    samples = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            samples[name] += timer(fn, args.repeats)
    median = {name: statistics.median(ts) for name, ts in samples.items()}

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "cpu_kernel": cpu_kernel_variant() if device.type == "cpu" else None,
        "model": args.model,
        "parameters": numel,
        "tensors": len(shapes),
        "dtype": args.dtype,
        "momentum": args.momentum,
        "median_ms": {name: 1e3 * t for name, t in median.items()},
        "speedup_vs_reference": median["reference"] / median["fused"],
        "speedup_vs_foreach": median["foreach"] / median["fused"],
        "fused_bandwidth_GBps": moved / median["fused"] / 1e9,
    }
    if "d2d_copy" in median:
        graphs = "fused_graph" in median and "d2d_copy_graph" in median
        fused_t = median["fused_graph"] if graphs else median["fused"]
        copy_t = median["d2d_copy_graph"] if graphs else median["d2d_copy"]
        result["bandwidth_timing"] = "cuda graph replay" if graphs else "eager"
        result["fused_bandwidth_GBps"] = moved / fused_t / 1e9
        result["copy_bandwidth_GBps"] = moved / copy_t / 1e9
        result["fused_fraction_of_copy"] = copy_t / fused_t

    print(f"{result['model']}: {numel / 1e6:.1f}M {args.dtype} parameters in {len(shapes)} tensors, "
          f"momentum {args.momentum}, {result['device']}, torch {torch.__version__}"
          + (f", CPU kernel: {result['cpu_kernel']}" if result["cpu_kernel"] else ""))
    for name, ms in result["median_ms"].items():
        print(f"  {name:15s} {ms:9.3f} ms  (median of {len(samples[name])})")
    print(f"  fused vs reference: {result['speedup_vs_reference']:.2f}x   fused vs foreach: {result['speedup_vs_foreach']:.2f}x")
    print(f"  fused effective bandwidth: {result['fused_bandwidth_GBps']:.1f} GB/s")
    if "d2d_copy" in median:
        print(f"  ({result['bandwidth_timing']}) fused {result['fused_bandwidth_GBps']:.1f} GB/s, d2d copy "
              f"{result['copy_bandwidth_GBps']:.1f} GB/s: fused reaches {100 * result['fused_fraction_of_copy']:.0f}% of it")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return result


if __name__ == "__main__":
    main()
