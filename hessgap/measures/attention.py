"""The GL(h) symmetry of attention heads: where each head's query/key and value/output weights live in a
model's parameters, as pairs of (k × h) blocks (G, H) whose product G·Hᵀ is all the function sees.

For one head of width h, the scores are (x W_Q + b_Q)(x W_K + b_K)ᵀ, so G = [W_Q; b_Q] and H = [W_K; b_K]
(the bias as one more row) can become (G·A, H·A⁻ᵀ) for any invertible h × h matrix A without changing the
scores; likewise the head's values x W_V + b_V and its rows of the output projection, G = [W_V; b_V] and H
= W_O's columns of the head: (G·A, H·A⁻ᵀ) leaves the output unchanged. Used by the invariance check's
rescaled copies (:mod:`.rescale`) and by geodesic sharpness (:mod:`.geodesic`), which measures sharpness on
the quotient by these symmetries.

Found in ``torch.nn.MultiheadAttention`` (packed in-projection, no ``bias_k``) and in Hugging Face-style
attention modules: separate ``q_proj``/``k_proj``/``v_proj`` with ``o_proj``/``out_proj``/``dense`` (ViT,
OPT, BART, Llama-style), BERT's ``query``/``key``/``value`` with the parent's ``output.dense``, GPT-2's packed
``c_attn``/``c_proj`` (``Conv1D``, weights stored transposed). Rotary position embeddings rotate queries and
keys by position, which only matrices commuting with the rotations survive: such models keep the value/
output pairs only; so do grouped-query heads (several query heads share a key head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Piece:
    """A slice of one parameter that forms rows of a head's block: ``narrow(dim, start, stop − start)``; a
    2-D slice is transposed to (k × h) when ``transpose``; a bias slice is one row."""

    param: str
    dim: int
    start: int
    stop: int
    transpose: bool = False


@dataclass(frozen=True)
class HeadPair:
    """One head's (G, H): ``kind`` "qk" or "vo", the attention module's name, the head, and the pieces of
    each block (stacked by rows)."""

    kind: str
    module: str
    head: int
    g: tuple
    h: tuple


def _view(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    part = tensor.narrow(piece.dim, piece.start, piece.stop - piece.start)
    if part.dim() == 1:
        return part.unsqueeze(0)
    return part.T if piece.transpose else part


def block(params: dict, pieces) -> torch.Tensor:
    """The (k × h) block of ``pieces`` read from ``params`` (name → tensor)."""
    return torch.cat([_view(params[p.param], p) for p in pieces])


def write_block(params: dict, pieces, value: torch.Tensor) -> None:
    """Write the (k × h) ``value`` into the pieces' slices of ``params`` (name → tensor), in place."""
    row = 0
    for p in pieces:
        view = _view(params[p.param], p)
        view.copy_(value[row:row + view.shape[0]])
        row += view.shape[0]


def _rows(name: str, module: nn.Module, offset: int, h: int, head: int, transposed: bool) -> tuple:
    """G-type pieces of a projection: its weight's output units of the head (and its bias)."""
    start = offset + head * h
    dim = 1 if transposed else 0  # Conv1D stores (in, out): the head's outputs are columns
    pieces = [Piece(f"{name}.weight", dim, start, start + h, transpose=not transposed)]
    if getattr(module, "bias", None) is not None:
        pieces.append(Piece(f"{name}.bias", 0, start, start + h))
    return tuple(pieces)


def _output(name: str, h: int, head: int, transposed: bool) -> tuple:
    """The H pieces of an output projection: its weight's input units of the head."""
    start = head * h
    return (Piece(f"{name}.weight", 0 if transposed else 1, start, start + h, transpose=transposed),)


def _heads(module: nn.Module) -> tuple[int | None, int | None, int | None]:
    """(heads, head width, key/value heads) of a Hugging Face-style attention module, from its attributes."""
    config = getattr(module, "config", None)
    heads = next((getattr(o, a) for o in (module, config) if o is not None
                  for a in ("num_heads", "num_attention_heads", "n_heads", "n_head") if isinstance(getattr(o, a, None), int)), None)
    width = next((getattr(module, a) for a in ("head_dim", "attention_head_size") if isinstance(getattr(module, a, None), int)), None)
    groups = getattr(module, "num_key_value_groups", 1)
    kv = heads // groups if heads and isinstance(groups, int) and groups > 0 else heads
    return heads, width, kv


def _rotary(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is not None and (getattr(config, "rope_theta", None) is not None or
                               getattr(config, "position_embedding_type", None) == "rotary" or
                               getattr(config, "rope_scaling", None) is not None):
        return True
    return any("Rotary" in type(m).__name__ for m in model.modules())


def _trainable(params: dict, pieces) -> bool:
    return all(p.param in params and params[p.param].requires_grad for p in pieces)


def _packed(name: str, m: nn.MultiheadAttention) -> list[tuple]:
    """nn.MultiheadAttention: rows of the packed in-projection (Q, K, V stacked), columns of out_proj."""
    e, heads = m.embed_dim, m.num_heads
    h = e // heads

    def proj(offset, head):
        pieces = [Piece(f"{name}in_proj_weight", 0, offset + head * h, offset + (head + 1) * h, True)]
        if m.in_proj_bias is not None:
            pieces.append(Piece(f"{name}in_proj_bias", 0, offset + head * h, offset + (head + 1) * h))
        return tuple(pieces)
    return [(proj(0, i), proj(e, i), proj(2 * e, i), _output(f"{name}out_proj", h, i, False)) for i in range(heads)]


def _layout(name: str, m: nn.Module, modules: dict) -> tuple[list[tuple] | None, str | None]:
    """Per head the (Q, K, V, O) pieces of an attention module, or None (and why, when it is attention)."""
    prefix = f"{name}." if name else ""
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            return None, f"{name}: separate q/k/v weights, bias_k or zero attention: left out"
        return _packed(prefix, m), None
    names = next((t for t in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
                  if all(isinstance(getattr(m, a, None), nn.Linear) for a in t)), None)
    if names is not None:
        out = next((f"{prefix}{a}" for a in ("o_proj", "out_proj", "dense") if isinstance(getattr(m, a, None), nn.Linear)),
                   None)
        parent = name.rpartition(".")[0]
        if out is None and isinstance(getattr(getattr(modules.get(parent), "output", None), "dense", None), nn.Linear):
            out = f"{parent}.output.dense" if parent else "output.dense"  # BERT: the output is the parent's
        heads, h, kv = _heads(m)
        if out is None or heads is None or h is None:
            return None, f"{name}: attention projections without a known output projection or head count: left out"
        if kv != heads:
            return None, f"{name}: grouped key/value heads ({kv} for {heads} query heads): left out"
        return [tuple(_rows(prefix + a, getattr(m, a), 0, h, i, False) for a in names) + (_output(out, h, i, False),)
                for i in range(heads)], None
    if type(getattr(m, "c_attn", None)).__name__ == "Conv1D" and type(getattr(m, "c_proj", None)).__name__ == "Conv1D":
        if getattr(m, "is_cross_attention", False):
            return None, f"{name}: cross-attention: left out"
        heads, h, _ = _heads(m)
        d = getattr(m, "split_size", None) or heads * h
        return [tuple(_rows(prefix + "c_attn", m.c_attn, offset, h, i, True) for offset in (0, d, 2 * d)) +
                (_output(prefix + "c_proj", h, i, True),) for i in range(heads)], None
    return None, None


def find_heads(model: nn.Module) -> tuple[list[HeadPair], list[str]]:
    """Every head's (G, H) pairs in ``model`` and notes on what was left out (see the module docstring)."""
    pairs, notes = [], []
    rotary = _rotary(model)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for name, m in modules.items():
        layout, note = _layout(name, m, modules)
        if note:
            notes.append(note)
        for i, (q, k, v, o) in enumerate(layout or ()):
            candidates = ([] if rotary else [HeadPair("qk", name, i, q, k)]) + [HeadPair("vo", name, i, v, o)]
            pairs += [pair for pair in candidates if _trainable(params, pair.g + pair.h)]
    if rotary and pairs:
        notes.append("rotary position embeddings: the query/key pairs are left out (only value/output pairs)")
    return pairs, notes


def covered(model: nn.Module, pairs) -> dict[str, torch.Tensor]:
    """Per parameter name, a boolean mask of the entries that belong to some head's block."""
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    for pair in pairs:
        for piece in pair.g + pair.h:
            masks[piece.param].narrow(piece.dim, piece.start, piece.stop - piece.start).fill_(True)
    return masks
