"""The exact Hessian-vector product against the finite-difference one, in float32 and bfloat16, at equal cost.

Finite differences, (∇L(θ + h·v) − ∇L(θ − h·v)) / 2h, cost two gradients, as one exact product (R-operator,
hessgap.hvp) does. Both run on the same weights (rounded to bfloat16 once, so every dtype sees the same θ) and
are compared with the exact product in float64: relative error ‖Hv − ref‖ / ‖ref‖ over a few random unit
directions. The finite difference gets its best step from a grid (h = c·‖θ‖), which favours it: a user has
no reference to choose h with.

    python benchmarks/fd_vs_exact_hvp.py [--layers 2 --hidden 64 --tokens 64]
"""

from __future__ import annotations

import argparse
import copy

import torch

import hessgap

STEPS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)


def build(layers: int, hidden: int, vocab: int):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=256)
    # θ rounded to bfloat16 once: the float32 and float64 copies hold the very same values
    return transformers.LlamaForCausalLM(cfg).eval().to(torch.bfloat16)


def gradient(model, batch, theta: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    torch.nn.utils.vector_to_parameters(theta.to(params[0].dtype), params)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in params]).double()


def finite_difference(model, batch, v: torch.Tensor, c: float) -> torch.Tensor:
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double()
    h = c * float(theta.norm())
    try:
        return (gradient(model, batch, theta + h * v) - gradient(model, batch, theta - h * v)) / (2 * h)
    finally:
        torch.nn.utils.vector_to_parameters(theta.to(next(model.parameters()).dtype), model.parameters())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--directions", type=int, default=3)
    args = parser.parse_args()
    low = build(args.layers, args.hidden, args.vocab)
    models = {"float64": copy.deepcopy(low).double(), "float32": copy.deepcopy(low).float(), "bfloat16": low}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (2, args.tokens), generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    n = sum(p.numel() for p in low.parameters())
    V = torch.randn(args.directions, n, generator=gen, dtype=torch.float64)
    V /= V.norm(dim=1, keepdim=True)
    reference = hessgap.hvp(models["float64"], [batch], V)
    print(f"{n} parameters, {2 * args.tokens} tokens, {args.directions} unit directions; "
          "relative error against the exact float64 product")
    print("| dtype | exact (R-operator) | finite difference, best h = c·‖θ‖ | c |")
    print("|---|---|---|---|")
    for name in ("float32", "bfloat16"):
        model = models[name]
        exact = hessgap.hvp(model, [batch], V.float(), return_info=True)
        errors = {c: relative(torch.stack([finite_difference(model, batch, v, c) for v in V]), reference)
                  for c in STEPS}
        best = min(errors, key=errors.get)
        print(f"| {name} | {relative(exact.value.double(), reference):.1e} ({exact.path}) | {errors[best]:.1e} | "
              f"{best:g} |")
        print("  every step:", ", ".join(f"c={c:g}: {e:.1e}" for c, e in errors.items()))


if __name__ == "__main__":
    main()
