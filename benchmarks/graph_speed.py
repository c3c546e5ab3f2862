"""Where the graph engine's time goes on the models people measure, and how it compares per vector with a
retained-graph double backward (PyHessian's mode) and curvlinops, at k = 16, in gradients.

Models (random weights from configs, eval mode, nothing downloaded; the shapes of ``benchmarks/zoo_models.py``'s
benchmark size):

    gpt2       transformers GPT2LMHeadModel, 4 layers × width 256, 4 heads, vocabulary 8192, batch 4 × 256 tokens
               (the last row right-padded over its last third: attention mask, targets -100), next-token loss
    llama      transformers LlamaForCausalLM, 4 × 256, 4 query heads over 2 key/value heads (grouped-query), RMSNorm,
               SiLU gates, rotary positions; same batch
    bert       transformers BertForSequenceClassification, 4 × 256, 3 classes, batch 4 × 256 tokens (padded)
    vit        transformers ViTForImageClassification shaped as vit_tiny_patch16_224 (12 layers × 192, 3 heads,
               MLP 768, patch 16), batch 2 × 3 × 224 × 224, 10 classes
    resnet18   transformers ResNetForImageClassification shaped as torchvision's resnet18 (7×7/2 stem, max-pool,
               [2, 2, 2, 2] basic blocks, 64–512), batch 2 × 3 × 224 × 224, 10 classes
    convnext   plain PyTorch ConvNeXt shaped as timm's convnext_atto (4×4/4 stem, depths [2, 2, 6, 2], widths
               40–320, 7×7 depthwise convolutions, channels-last LayerNorm, GELU MLPs, layer scale), batch 2 × 3 ×
               224 × 224, 10 classes

Per vector, as a multiple of one gradient (forward + backward of the batch loss, default kernels) timed in the
same interleaved rounds; medians over rounds:

    fused            hessgap.HessianOperator(model, [batch]).matmat(V), the k vectors at once (the capture is done
                     before timing; the primal pass is kept between calls, as a retained graph is)
    retained_graph   ∇L built once with create_graph (not timed), then one autograd.grad per vector
    curvlinops       curvlinops.HessianLinearOperator(...) @ V in blocks of --curvlinops-block columns

Peers run attention on PyTorch's math kernels (the fused CPU kernels have no double-backward rule).

    python benchmarks/graph_speed.py --threads 1 --clock process --rounds 3 --json out.json
    python benchmarks/graph_speed.py --models gpt2 --profile        # the fused path's top ops
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessgap

from _timing import CLOCKS
from zoo_models import CausalLM, ImageClassifier, SequenceClassifier

IGNORE = -100


# ---- models ----------------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (N, C, H, W) maps, through channels-last (as timm's ConvNeXt does)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """timm's convnext_atto layout in plain PyTorch."""

    def __init__(self, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), classes=10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.head(self.norm(self.features(x).mean((2, 3))))


def token_batch(batch, length, vocab, seed, classes=None):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, length - length // 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    if classes is None:
        return ids, mask, ids.masked_fill(mask == 0, IGNORE)[:, 1:]
    return ids, mask, torch.randint(0, classes, (batch,), generator=gen)


def image_batch(batch, seed, side=224, classes=10):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, side, side, generator=gen), torch.randint(0, classes, (batch,), generator=gen)


def build(name: str, width: int = 256, layers: int = 4, vocab: int = 8192, tokens=(4, 256)):
    """(model, batch): the batch is (x1, ..., xm, targets)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab, n_positions=512,
                                         bos_token_id=1, eos_token_id=2)
        return CausalLM(transformers.GPT2LMHeadModel(config)).eval(), token_batch(*tokens, vocab, 9)
    if name == "llama":
        config = transformers.LlamaConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                          max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return CausalLM(transformers.LlamaForCausalLM(config)).eval(), token_batch(*tokens, vocab, 9)
    if name == "bert":
        config = transformers.BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                         num_attention_heads=4, intermediate_size=4 * width,
                                         max_position_embeddings=514, num_labels=3, pad_token_id=0)
        model = SequenceClassifier(transformers.BertForSequenceClassification(config)).eval()
        return model, token_batch(*tokens, vocab, 9, classes=3)
    if name == "vit":
        config = transformers.ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12,
                                        num_attention_heads=3, intermediate_size=768, num_labels=10)
        return ImageClassifier(transformers.ViTForImageClassification(config)).eval(), image_batch(2, 9)
    if name == "resnet18":
        config = transformers.ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                           depths=[2, 2, 2, 2], layer_type="basic", num_labels=10)
        return ImageClassifier(transformers.ResNetForImageClassification(config)).eval(), image_batch(2, 9)
    if name == "convnext":
        return ConvNeXt().eval(), image_batch(2, 9)
    raise KeyError(name)


MODELS = ("gpt2", "llama", "bert", "vit", "resnet18", "convnext")


# ---- methods ---------------------------------------------------------------------------------------------------

def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def gradient(model, batch, loss_fn):
    loss = loss_fn(model(*batch[:-1]), batch[-1])
    torch.autograd.grad(loss, _params(model), allow_unused=True)


def retained_graph(model, batch, loss_fn):
    params = _params(model)
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(loss_fn(model(*batch[:-1]), batch[-1]), params, create_graph=True,
                                    allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    sizes = [p.numel() for p in params]

    def products(V):
        for v in V:
            pieces = [piece.view_as(p) for piece, p in zip(v.split(sizes), params)]
            torch.autograd.grad([grads[i] for i in live], params, [pieces[i] for i in live], retain_graph=True,
                                allow_unused=True)

    return products


class Packed(nn.Module):
    """A model of several positional inputs as a function of one mapping (what curvlinops passes along)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, X):
        return self.model(*(X[f"x{i}"] for i in range(len(X))))


def curvlinops(model, batch, loss_fn, block):
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        return None
    inputs, targets = batch[:-1], batch[-1]
    if len(inputs) == 1:
        net, X, options = model, inputs[0], {}
    else:
        net, X = Packed(model), {f"x{i}": x for i, x in enumerate(inputs)}
        options = {"batch_size_fn": lambda X: X["x0"].shape[0]}
    operator = HessianLinearOperator(net, loss_fn, _params(model), [(X, targets)], check_deterministic=False,
                                     **options)

    def products(V):
        with sdpa_kernel([SDPBackend.MATH]):
            columns = V.T.contiguous()
            for i in range(0, columns.shape[1], block):
                operator @ columns[:, i:i + block]

    return products


def profile(model, batch, loss_fn, V, rows):
    operator = hessgap.HessianOperator(model, [batch], loss_fn=loss_fn)
    operator.matmat(V[:2])
    print(f"path {operator.path} {operator.fallback_reason or ''}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        operator.matmat(V)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    copied = sum(math.prod(e.input_shapes[0]) for e in prof.events()
                 if e.name == "aten::copy_" and e.input_shapes and e.input_shapes[0])
    print(f"elements copied by aten::copy_: {copied / V.shape[0] / 1e6:.1f}M per vector")


def measure(name, args, loss_fn, timed) -> dict:
    """One model's per-vector costs: every method timed in each of ``args.rounds`` interleaved rounds."""
    model, batch = build(name)
    n = sum(p.numel() for p in _params(model))
    V = torch.randn(args.k, n, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    operator = hessgap.HessianOperator(model, [batch], loss_fn=loss_fn)
    operator.matmat(V[:2])
    print(f"[{name}] n = {n:,}, path {operator.path} {operator.fallback_reason or ''}, capture + first call "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    methods = {"gradient": (lambda: gradient(model, batch, loss_fn), 1), "fused": (lambda: operator.matmat(V), args.k)}
    if "retained_graph" not in args.skip:
        products = retained_graph(model, batch, loss_fn)
        base = V[: args.baseline_vectors]
        products(base[:1])
        methods["retained_graph"] = (lambda: products(base), base.shape[0])
    failed = {}
    if "curvlinops" not in args.skip:
        try:
            products_c = curvlinops(model, batch, loss_fn, args.curvlinops_block)
            if products_c is not None:
                products_c(V[:1])
                methods["curvlinops"] = (lambda: products_c(V), args.k)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run this model is reported, not fatal
            failed["curvlinops"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"[{name}] curvlinops fails: {failed['curvlinops']}", flush=True)
    gradient(model, batch, loss_fn)
    rows: dict[str, list[float]] = {key: [] for key in methods}
    for r in range(args.rounds):
        for key, (fn, units) in methods.items():
            rows[key].append(timed(fn) / units)
        print(f"[{name}] round {r + 1} (s per unit): " + ", ".join(f"{k}={v[-1]:.4g}" for k, v in rows.items()),
              flush=True)
    median = {key: statistics.median(v) for key, v in rows.items()}
    ratios = {key: median[key] / median["gradient"] for key in median if key != "gradient"}
    summary = {"n": n, "path": operator.path, "fallback_reason": operator.fallback_reason, "median_seconds": median,
               "seconds": rows, "gradients_per_vector": ratios, "failed": failed}
    for other in ("retained_graph", "curvlinops"):
        if other in ratios:
            summary[f"fused_over_{other}"] = ratios["fused"] / ratios[other]
    print(f"[{name}] per vector in gradients: " + ", ".join(f"{k}={v:.3g}" for k, v in ratios.items())
          + "".join(f", fused/{o}={summary[f'fused_over_{o}']:.3f}" for o in ("retained_graph", "curvlinops")
                    if f"fused_over_{o}" in summary), flush=True)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-vectors", type=int, default=4,
                        help="vectors timed for the retained graph (its cost per vector is flat)")
    parser.add_argument("--curvlinops-block", type=int, default=4, help="columns per curvlinops matmat")
    parser.add_argument("--skip", nargs="*", default=[], choices=["retained_graph", "curvlinops"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process")
    parser.add_argument("--profile", action="store_true", help="print the fused path's profile of each model")
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]

    def timed(fn):
        start = clock()
        fn()
        return clock() - start

    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    report = {"command": "python benchmarks/graph_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
                         f"{torch.__version__}", "clock": args.clock, "k": args.k,
              "load_average": list(os.getloadavg()), "models": {}}
    for name in args.models:
        if args.profile:
            model, batch = build(name)
            n = sum(p.numel() for p in _params(model))
            print(f"[{name}] n = {n:,}")
            profile(model, batch, loss_fn, torch.randn(args.k, n, generator=torch.Generator().manual_seed(2)),
                    args.profile_rows)
            continue
        report["models"][name] = measure(name, args, loss_fn, timed)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
