"""Peak memory of a Hessian-vector product on a Llama-shaped decoder against the model's own gradient.

A Llama-shaped causal LM (4 layers × 256, grouped-query attention, Hugging Face ``LlamaForCausalLM`` with
random weights, its own next-token loss), one batch of ``batch × tokens`` tokens; for each vocabulary size
and method, the peak resident memory above the model and its data while one call runs, each method in a
fresh process (``_timing.peak_memory``: a warm-up call, then the measured one):

- ``gradient``: ``loss.backward()``, the yardstick;
- ``hessgap k=1`` / ``k=8``: ``hessgap.hvp`` with 1 and 8 directions (graph engine: the fused LM head +
  cross-entropy chunks the logits; ``--max-memory`` passes a budget);
- ``hessgap k=1 unfused``: the same without the fused LM head (the logits as plain graph nodes: before);
- ``double backward``: the retained-graph double backward (grad with create_graph, then grad of ⟨g, v⟩).

Ratios are to the gradient's peak; k = 8 is also given less the 8 vectors' and 8 products' own bytes.
A method that runs out of memory (or past ``--timeout``) is reported as such.

    python benchmarks/llm_memory.py [--vocab 128000,32000] [--tokens 1024] [--batch 2] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import _timing


def build(vocab: int, tokens: int, batch: int, layers: int = 4, width: int = 256):
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    config = transformers.LlamaConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=vocab,
                                      max_position_embeddings=max(tokens, 2048), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids.clone()}


def setup(method: str, vocab: int, tokens: int, batch: int, max_memory, fuse: bool = True):
    """Builds the model and batch, warms the method up, returns the call to measure (``fuse=False``: the graph
    engine without the fused LM head, the logits as plain nodes: the figure before it)."""
    import hessgap

    if not fuse:
        from hessgap.curvature.graph import program

        program.fuse_lm_head = lambda graph: {}

    model, data = build(vocab, tokens, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)

    if method == "gradient":
        def run():
            model.zero_grad(set_to_none=True)
            model(**data).loss.backward()
            model.zero_grad(set_to_none=True)
    elif method.startswith("hessgap"):
        k = int(method.split("=")[1])
        vectors = torch.randn(k, n, generator=torch.Generator().manual_seed(2))

        def run():
            return hessgap.hvp(model, [data], vectors, path="fused", max_memory=max_memory)
    elif method == "double backward":
        vector = [torch.randn_like(p) for p in params]

        def run():
            # the math attention kernel: the CPU flash kernel has no double backward
            with sdpa_kernel([SDPBackend.MATH]):
                grads = torch.autograd.grad(model(**data).loss, params, create_graph=True)
                dot = sum((g * v).sum() for g, v in zip(grads, vector))
                return torch.autograd.grad(dot, params)
    else:
        raise ValueError(method)
    run()  # captures, first-call allocations
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="128000,32000")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--methods", default="gradient,hessgap k=1,hessgap k=8,double backward")
    parser.add_argument("--max-memory", default=None, help='hessgap\'s budget, e.g. "1GB" (default: its own)')
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    rows = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        found: dict[str, dict] = {}
        for method in args.methods.split(","):
            name, fuse = method.removesuffix(" unfused"), not method.endswith(" unfused")
            try:
                found[method] = _timing.peak_memory(setup, name, vocab, args.tokens, args.batch, args.max_memory,
                                                    fuse, timeout=args.timeout)
            except RuntimeError as error:
                found[method] = {"error": str(error)[:300]}
            print(json.dumps({"vocab": vocab, "method": method, **found[method]}), flush=True)
        base = found.get("gradient", {}).get("bytes")
        model, _ = build(vocab, 8, 1)
        vector_bytes = sum(p.numel() for p in model.parameters()) * 4
        for method, out in found.items():
            row = {"vocab": vocab, "tokens": args.batch * args.tokens, "method": method,
                   "GB": round(out["bytes"] / 1e9, 2) if "bytes" in out else None, "error": out.get("error")}
            if base and "bytes" in out:
                row["x gradient"] = round(out["bytes"] / base, 2)
                if method.startswith("hessgap"):
                    k = int(method.removesuffix(" unfused").split("=")[1])
                    row["x gradient less vectors"] = round((out["bytes"] - 2 * k * vector_bytes) / base, 2)
            rows.append(row)
    print(json.dumps({"machine": _timing.machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
