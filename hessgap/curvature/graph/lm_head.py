"""The LM head and its cross-entropy as one node of the captured graph, run by the fused op
:mod:`hessgap.ops.linear_ce_rop`: the logits (tokens × vocabulary) are never held for all tokens, nor their
k tangents.

:func:`fuse_lm_head` rewrites ``cross_entropy(flatten(shift(cast(linear(h, W, b)))), labels)`` — the shape
of a Hugging Face causal-LM loss: the projection to the vocabulary, an optional float32 cast, the shift
``[..., :-1, :]``, the flatten to (tokens, vocabulary) — into one call of :func:`lm_head_cross_entropy`
when every intermediate value has no other use. The shift and flatten then apply to ``h`` (the vocabulary
is the last dimension throughout), the cast to the op's inputs. A tied weight (GPT-2's lm_head = wte) is
the same parameter placeholder as the embedding's: the engine adds the R-gradients of both uses there.
"""

from __future__ import annotations

import torch
from torch import fx

from ..._memory import available_bytes
from ...ops import linear_ce_rop as fused
from .rules import RULES
from .rules.base import OpRule

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_IDENTITIES = {aten.clone.default, aten.contiguous.default, aten.alias.default}
_CASTS = {aten._to_copy.default, aten.to.dtype}
_CHECKS = {aten._assert_tensor_metadata.default}  # no-op checks (a cast to the dtype a value already has)
#: share of the free memory the op's chunks may take when no budget is set
FREE_SHARE = 0.25
#: the default budget's ceiling: 128+ tokens a chunk already keep the matmuls efficient at a 128k vocabulary
DEFAULT_BUDGET = 512 << 20


def _users(node: fx.Node) -> list[fx.Node]:
    """The node's users other than metadata checks."""
    return [u for u in node.users if u.target not in _CHECKS]


def _shape_ops(logits: fx.Node, vocab: int):
    """The ops between the linear and the cross-entropy as (ops, cast dtype, linear node), or None when the
    chain holds anything else, a value with another use, or an op that touches the vocabulary dimension."""
    ops: list[tuple] = []
    cast = None
    node = logits
    while node.op == "call_function" and node.target is not aten.linear.default:
        if len(_users(node)) != 1:
            return None
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.shape[-1] != vocab:
            return None
        if node.target in _VIEWS:
            ops.append(("view", tuple(int(s) for s in value.shape[:-1])))
        elif node.target is aten.slice.Tensor:
            source = node.args[0].meta["val"]
            args = list(node.args) + [None] * 4
            dim = args[1] if args[1] is not None else 0
            dim = dim + source.dim() if dim < 0 else dim
            if dim == source.dim() - 1:
                return None
            start, end, step = args[2], args[3], args[4] if args[4] is not None else 1
            ops.append(("slice", dim - source.dim(), start, end, step))
        elif node.target in _CASTS:
            if set(node.kwargs) - {"dtype", "layout", "device", "memory_format"} or len(node.args) > (2 if node.target is aten.to.dtype else 1):
                return None
            if cast is None:
                cast = value.dtype  # the last cast on the way back is the first applied: keep the outermost
        elif node.target not in _IDENTITIES:
            return None
        node = node.args[0]
    if node.op != "call_function" or len(_users(node)) != 1:
        return None
    return tuple(reversed(ops)), cast, node


def fuse_lm_head(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Rewrites each fusable LM-head cross-entropy of ``graph`` in place; returns {cross-entropy node: fused node}."""
    replaced: dict[fx.Node, fx.Node] = {}
    for ce in list(graph.nodes):
        if ce.op != "call_function" or ce.target is not aten.cross_entropy_loss.default:
            continue
        args = list(ce.args) + [None] * 6
        options = dict(weight=args[2], reduction=args[3], ignore_index=args[4], label_smoothing=args[5])
        for key, value in ce.kwargs.items():
            options[key] = value
        reduction = 1 if options["reduction"] is None else options["reduction"]
        ignore_index = -100 if options["ignore_index"] is None else options["ignore_index"]
        if options["weight"] is not None or (options["label_smoothing"] or 0.0) != 0.0 or reduction not in (1, 2):
            continue
        logits, labels = ce.args[0], ce.args[1]
        if not isinstance(logits, fx.Node) or not isinstance(labels, fx.Node):
            continue
        if labels.meta["val"].is_floating_point() or len(logits.meta["val"].shape) != 2:
            continue
        found = _shape_ops(logits, int(logits.meta["val"].shape[-1]))
        if found is None:
            continue
        ops, cast, linear = found
        h, weight = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else None
        if not isinstance(weight, fx.Node) or len(weight.meta["val"].shape) != 2:
            continue
        with graph.inserting_before(ce):
            node = graph.call_function(lm_head_cross_entropy, (h, weight, bias, labels),
                                       dict(ops=ops, dtype=cast, ignore_index=int(ignore_index),
                                            reduction=int(reduction)))
        node.meta = dict(ce.meta)
        node.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", ce.meta.get("nn_module_stack"))
        ce.replace_all_uses_with(node)
        chain = [ce]
        while chain[-1] is not linear:
            chain.append(chain[-1].args[0])
        for dead in chain:
            for check in [u for u in dead.users if u.target in _CHECKS]:
                graph.erase_node(check)
            graph.erase_node(dead)
        replaced[ce] = node
    return replaced


# ---- the fused node's semantics ---------------------------------------------------------------------------


def apply_shape_ops(t: torch.Tensor, ops, batched: bool = False) -> torch.Tensor:
    """The recorded shift and flatten applied to tokens ``t`` (…, d) (``batched``: a leading k)."""
    lead = (t.shape[0],) if batched else ()
    for op in ops:
        if op[0] == "view":
            t = t.reshape(lead + op[1] + (t.shape[-1],))
        else:
            _, dim, start, end, step = op
            t = t[(slice(None),) * (t.dim() + dim) + (slice(start, end, step),)]
    return t.reshape(lead + (-1, t.shape[-1]))


def lm_head_cross_entropy(h, weight, bias, labels, *, ops, dtype, ignore_index, reduction):
    """What the fused node computes: cross-entropy of the shifted, flattened logits ``h Wᵀ + b`` (in ``dtype``
    when the model casts them), plain PyTorch."""
    logits = torch.nn.functional.linear(h, weight, bias)
    rows = apply_shape_ops(logits, ops)
    if dtype is not None:
        rows = rows.to(dtype)
    return torch.nn.functional.cross_entropy(rows, labels.reshape(-1), ignore_index=ignore_index,
                                             reduction="mean" if reduction == 1 else "sum")


class LmHeadCrossEntropy(OpRule):
    """The rule of :func:`lm_head_cross_entropy` nodes: the primal loss and gradients, and the R-gradients, of
    the fused op in chunks (the chunks' sizes from the memory budget, :attr:`max_memory` bytes)."""

    needs_grad = True
    #: bytes the op's chunks may take; None: a share of what the device has free, at most DEFAULT_BUDGET
    max_memory: int | None = None

    def __init__(self, node):
        super().__init__(node)
        self.options = dict(node.kwargs)
        self.chunks: dict[str, int] = {}

    def inputs(self):
        h, weight, bias = self.node.args[:3]
        return [h, weight, bias if isinstance(bias, fx.Node) else None]

    def _budget(self, device) -> int:
        if self.max_memory is not None:
            return int(self.max_memory)
        free = available_bytes(device)
        return min(int(free * FREE_SHARE), DEFAULT_BUDGET) if free else DEFAULT_BUDGET

    def _compute_dtype(self, h):
        return self.options["dtype"] or h.dtype

    def forward(self, args, kwargs):
        h, weight, bias, labels = args
        dtype = self._compute_dtype(h)
        rows = apply_shape_ops(h, self.options["ops"]).to(dtype)
        w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
        targets, weights = fused.token_weights(labels, self.options["ignore_index"],
                                               "mean" if self.options["reduction"] == 1 else "sum",
                                               fused.accumulation_dtype(dtype))
        itemsize = torch.finfo(fused.accumulation_dtype(dtype)).bits // 8
        chunk, vocab_chunk = fused.choose_chunks(rows.shape[0], w.shape[0], 0, itemsize, self._budget(h.device))
        self.chunks.update(forward_token_chunk=chunk, forward_vocab_chunk=vocab_chunk)
        loss, lse, gh, gw, gb = fused.linear_ce_forward(rows.contiguous(), w.contiguous(), b, targets, weights,
                                                        chunk, vocab_chunk)
        positions = torch.arange(h[..., 0].numel(), device=h.device).reshape(h.shape[:-1] + (1,))
        index = apply_shape_ops(positions, self.options["ops"]).reshape(-1)
        saved = dict(rows=rows.contiguous(), w=w.contiguous(), b=b, targets=targets, weights=weights, lse=lse,
                     gh=gh, gw=gw, gb=gb, index=index, h_shape=h.shape, h_dtype=h.dtype, w_dtype=weight.dtype)
        # the loss of a half-precision model stays in float32 when it is the graph's output (as CrossEntropy's)
        return (loss if self.is_output else loss.to(self.out_meta.dtype)), saved

    def _to_tokens(self, saved, g_rows, batched: bool):
        """∂/∂h from ∂/∂(shifted, flattened rows): rows added back at the tokens they came from."""
        shape, d = saved["h_shape"], saved["h_shape"][-1]
        lead = (g_rows.shape[0],) if batched else ()
        tokens = g_rows.new_zeros(lead + (shape[:-1].numel(), d), dtype=saved["h_dtype"])
        tokens.index_add_(len(lead), saved["index"], g_rows.to(saved["h_dtype"]))
        return tokens.reshape(lead + tuple(shape))

    def vjp(self, saved, g, need):
        scale = g.to(saved["gh"].dtype)
        out = [self._to_tokens(saved, saved["gh"] * scale, False) if need[0] else None,
               (saved["gw"] * scale).to(saved["w_dtype"]) if need[1] else None,
               (saved["gb"] * scale).to(saved["w_dtype"]) if need[2] else None]
        return out

    def jvp(self, saved, tangents):
        th, tw, tb = tangents
        dtype = saved["rows"].dtype
        dh = apply_shape_ops(th, self.options["ops"], batched=True).to(dtype).contiguous() if th is not None else None
        dw = tw.to(dtype).contiguous() if tw is not None else None
        db = tb.to(dtype).contiguous() if tb is not None else None
        rsaved = (dh, dw, db)
        if self.is_output:
            return None, rsaved
        r_loss = 0
        for grad, t in ((saved["gh"], dh), (saved["gw"], dw), (saved["gb"], db)):
            if t is not None:
                r_loss = r_loss + (t * grad).flatten(1).sum(1)
        return r_loss.to(self.out_meta.dtype), rsaved

    def rvjp(self, saved, rsaved, g, rg, need):
        dh, dw, db = rsaved
        k = next(t.shape[0] for t in rsaved if t is not None)
        rows, w = saved["rows"], saved["w"]
        itemsize = torch.finfo(saved["lse"].dtype).bits // 8
        chunk, vocab_chunk = fused.choose_chunks(rows.shape[0], w.shape[0], k, itemsize, self._budget(rows.device))
        self.chunks.update(token_chunk=chunk, vocab_chunk=vocab_chunk)
        weights = saved["weights"] * g.to(saved["weights"].dtype)
        _, rgh, rgw, rgb = fused.linear_ce_rgrad(rows, w, saved["b"], saved["targets"], weights, saved["lse"],
                                                 dh, dw, db, chunk, vocab_chunk)
        if rg is not None:  # the loss feeds more than the seed: its gradients scaled by R{∂L/∂loss}
            rg = rg.to(rgh.dtype).reshape(-1, 1, 1)
            rgh, rgw = rgh + rg * saved["gh"], rgw + rg * saved["gw"]
            rgb = rgb + rg.reshape(-1, 1) * saved["gb"]
        return [self._to_tokens(saved, rgh, True) if need[0] else None,
                rgw.to(saved["w_dtype"]) if need[1] else None,
                rgb.to(saved["w_dtype"]) if need[2] else None]


RULES[lm_head_cross_entropy] = LmHeadCrossEntropy
