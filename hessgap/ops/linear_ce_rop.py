"""The fused LM head + cross-entropy and its R-gradients, ``torch.ops.hessgap.linear_ce_*``, and their
plain-PyTorch twins.

One logical op: tokens ``h`` (N, d), the vocabulary projection ``weight`` (V, d) and optional ``bias`` (V),
integer ``labels`` (N) and per-token weights ``w`` (N) (the mean over counted tokens is w = 1/count on counted
tokens, ignored tokens w = 0: :func:`token_weights`). Per token, z = W h + b, p = softmax(z) and

    L = Σ_t w_t (lse(z_t) − z_{t,y_t})          ∂L/∂z_t = w_t (p_t − e_{y_t})
    ∂L/∂h = (∂L/∂z) W      ∂L/∂W = (∂L/∂z)ᵀ h      ∂L/∂b = Σ_t ∂L/∂z_t

Along k tangents (ḣ (k, N, d), Ẇ (k, V, d), ḃ (k, V); any may be absent): ż = Ẇh + Wḣ + ḃ and
R{∂L/∂z_t} = w_t (p ⊙ ż − p (pᵀż)) (the softmax Hessian diag p − ppᵀ applied to ż), so

    R{L} = Σ ⟨∂L/∂z, ż⟩
    R{∂L/∂h} = R{∂L/∂z} W + (∂L/∂z) Ẇ            R{∂L/∂W} = R{∂L/∂z}ᵀ h + (∂L/∂z)ᵀ ḣ      R{∂L/∂b} = Σ_t R{∂L/∂z_t}

The compiled kernels go through the tokens in chunks of ``token_chunk`` and the vocabulary in chunks of
``vocab_chunk`` (0: all): the logits exist for one chunk at a time, never tokens × vocabulary for all tokens
nor k × tokens × vocabulary. With several vocabulary chunks the primal pass accumulates the log-sum-exp
online, then recomputes each chunk's logits; the R-pass reads the primal pass's ``lse`` and sweeps the
vocabulary twice (pᵀż first): twice the logit matmuls for c × vocab_chunk memory instead of c × V.
Inputs may be float32, float64, float16 or bfloat16; accumulation is float32 (float64 for float64); the
loss and lse come back in the accumulation dtype, the gradients in the inputs' dtype.
"""

from __future__ import annotations

import torch

from .. import _extension
from ..errors import HessgapError


def _ops():
    _extension.require()
    return torch.ops.hessgap


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_weights(labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with ignored tokens set to class 0, per-token weights) for cross-entropy's ``reduction``
    ("mean": 1/count on counted tokens, as ``F.cross_entropy``; "sum": 1)."""
    if reduction not in ("mean", "sum"):
        raise HessgapError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    labels = labels.reshape(-1)
    keep = labels != ignore_index
    weights = keep.to(dtype)
    if reduction == "mean":
        weights = weights / keep.sum().clamp(min=1).to(dtype)
    return torch.where(keep, labels, torch.zeros_like(labels)), weights


def choose_chunks(tokens: int, vocab: int, k: int, itemsize: int, budget: int,
                  min_tokens: int = 128) -> tuple[int, int]:
    """(token_chunk, vocab_chunk) whose R-pass workspace, about (2k + 4) numbers per token and vocabulary entry
    of a chunk, fits ``budget`` bytes: the whole vocabulary per sweep while that leaves ``min_tokens`` tokens
    a chunk (one sweep, no recomputed logits), else ``min_tokens`` tokens and a vocabulary chunk that fits."""
    per_entry = (2 * max(k, 1) + 4) * itemsize
    tokens = max(tokens, 1)
    fit = budget // max(per_entry * vocab, 1)
    if fit >= min(tokens, min_tokens):
        return int(min(tokens, fit)), int(vocab)
    chunk = min(tokens, min_tokens)
    columns = budget // max(per_entry * chunk, 1)
    if columns >= 256:
        columns -= columns % 256
    return int(chunk), int(max(1, min(vocab, columns)))


def linear_ce_forward(h, weight, bias, labels, weights, token_chunk: int = 0, vocab_chunk: int = 0):
    """(loss, lse (N,), ∂L/∂h, ∂L/∂W, ∂L/∂b) by the compiled kernel."""
    return _ops().linear_ce_forward.default(h, weight, bias, labels, weights, int(token_chunk), int(vocab_chunk))


def linear_ce_rgrad(h, weight, bias, labels, weights, lse, dh, dweight, dbias,
                    token_chunk: int = 0, vocab_chunk: int = 0):
    """(R{L} (k,), R{∂L/∂h} (k, N, d), R{∂L/∂W} (k, V, d), R{∂L/∂b} (k, V)) by the compiled kernel."""
    return _ops().linear_ce_rgrad.default(h, weight, bias, labels, weights, lse, dh, dweight, dbias,
                                          int(token_chunk), int(vocab_chunk))


# ---- plain-PyTorch twins (all logits at once) ------------------------------------------------------------


def _logits_and_grad(h, weight, bias, labels, weights):
    acc = accumulation_dtype(h.dtype)
    z = h.to(acc) @ weight.to(acc).T
    if bias is not None:
        z = z + bias.to(acc)
    lse = z.logsumexp(1)
    w = weights.to(acc)
    y = labels.long().clamp(0, weight.shape[0] - 1)
    p = torch.exp(z - lse.unsqueeze(1))
    rows = torch.arange(h.shape[0], device=h.device)
    g = p.clone()
    g[rows, y] -= 1
    return z, lse, p, g * w.unsqueeze(1), w, y


def linear_ce_forward_reference(h, weight, bias, labels, weights):
    z, lse, _, g, w, y = _logits_and_grad(h, weight, bias, labels, weights)
    loss = (w * (lse - z.gather(1, y.unsqueeze(1)).squeeze(1))).sum()
    acc = z.dtype
    return loss, lse, (g @ weight.to(acc)).to(h.dtype), (g.T @ h.to(acc)).to(h.dtype), g.sum(0).to(h.dtype)


def linear_ce_rgrad_reference(h, weight, bias, labels, weights, lse, dh, dweight, dbias):
    _, _, p, g, w, _ = _logits_and_grad(h, weight, bias, labels, weights)
    acc = p.dtype
    hs, ws = h.to(acc), weight.to(acc)
    terms = []
    if dh is not None:
        terms.append(dh.to(acc) @ ws.T)
    if dweight is not None:
        terms.append(hs @ dweight.to(acc).transpose(1, 2))
    if dbias is not None:
        terms.append(dbias.to(acc).unsqueeze(1))
    zdot = sum(terms[1:], terms[0])
    rz = w.unsqueeze(1) * p * (zdot - (p * zdot).sum(2, keepdim=True))
    rloss = (zdot * g).sum((1, 2))
    rgh = rz @ ws
    rgw = rz.transpose(1, 2) @ hs
    if dweight is not None:
        rgh = rgh + g @ dweight.to(acc)
    if dh is not None:
        rgw = rgw + g.T @ dh.to(acc)
    out = h.dtype
    return rloss, rgh.to(out), rgw.to(out), rz.sum(1).to(out)


# ---- fake kernels (shape only), registered when the build is there --------------------------------------

if _extension.available() and hasattr(torch.ops.hessgap, "linear_ce_forward"):

    @torch.library.register_fake("hessgap::linear_ce_forward")
    def _linear_ce_forward_fake(h, weight, bias, labels, weights, token_chunk, vocab_chunk):
        torch._check(h.dim() == 2 and weight.dim() == 2, lambda: "h must be (tokens, d), weight (vocabulary, d)")
        acc = accumulation_dtype(h.dtype)
        return (h.new_empty((), dtype=acc), h.new_empty((h.shape[0],), dtype=acc), torch.empty_like(h),
                weight.new_empty(weight.shape, dtype=h.dtype), weight.new_empty((weight.shape[0],), dtype=h.dtype))

    @torch.library.register_fake("hessgap::linear_ce_rgrad")
    def _linear_ce_rgrad_fake(h, weight, bias, labels, weights, lse, dh, dweight, dbias, token_chunk, vocab_chunk):
        first = next(t for t in (dh, dweight, dbias) if t is not None)
        k = first.shape[0]
        n, d = h.shape
        vocab = weight.shape[0]
        acc = accumulation_dtype(h.dtype)
        return (h.new_empty((k,), dtype=acc), h.new_empty((k, n, d)), h.new_empty((k, vocab, d)),
                h.new_empty((k, vocab)))
