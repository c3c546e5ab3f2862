"""Capturing one batch's loss as an ATen graph: ``torch.export.export(strict=False)``, then functionalized.

The captured function is ``(args, kwargs, targets) -> the batch's mean loss``: the model called as the
batch says (``model(*args, **kwargs)``), then ``loss_fn(outputs, targets)`` or the output's own ``.loss``
(Hugging Face). Parameters and buffers become graph inputs, so one capture serves every parameter value;
shapes, dtypes, the batch's structure and its non-tensor values are fixed by the capture and make up its
key (:func:`signature`).

``run_decompositions({})`` functionalizes the graph (in-place ops become out-of-place, dropout in eval
mode disappears, BatchNorm becomes ``_native_batch_norm_legit_no_training``) while keeping the high-level
ops the rules are written for: linear, conv, layer_norm, rms_norm, group_norm, scaled_dot_product_attention,
cross_entropy_loss.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from ..batches import Batch
from ..objective import output_tensor
from .experts import grouped_experts
from .rules import GraphUnsupported


class BatchLoss(nn.Module):
    """The function captured: a batch's mean loss from the model's inputs and the targets; with
    ``with_output``, also the model's output tensor (what the loss compares: the Gauss-Newton split)."""

    def __init__(self, model: nn.Module, loss_fn, own_loss: bool, with_output: bool = False):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.own_loss = own_loss
        self.with_output = with_output

    def forward(self, args, kwargs, targets):
        outputs = self.model(*args, **kwargs)
        if self.own_loss:
            loss = outputs.loss
        else:
            loss = self.loss_fn(output_tensor(outputs), targets)
        return (loss, output_tensor(outputs)) if self.with_output else loss


def call_inputs(batch: Batch, own_loss: bool):
    """What the captured function takes for ``batch``: (args, kwargs, targets)."""
    return (tuple(batch.args), dict(batch.kwargs), None if own_loss else batch.targets)


def signature(inputs) -> tuple:
    """The capture's key: the structure, each tensor's shape/dtype/device and every other value."""
    leaves, spec = pytree.tree_flatten(inputs)
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device), leaf.requires_grad))
        else:
            parts.append(("value", type(leaf).__name__, repr(leaf)))
    return (str(spec), tuple(parts))


@dataclass
class Captured:
    """A functionalized graph and what each of its placeholders stands for."""

    graph: torch.fx.Graph
    placeholders: list  # per placeholder, in order: ("param"|"buffer"|"constant", tensor) or ("input", leaf index)
    loss_node: torch.fx.Node
    seconds: float = 0.0
    output_node: torch.fx.Node | None = None  # the model's output tensor, when captured ``with_output``


def capture(model: nn.Module, loss_fn, own_loss: bool, inputs, with_output: bool = False) -> Captured:
    """Export the batch loss of ``model`` on ``inputs`` = (args, kwargs, targets) (and the model's output tensor
    ``with_output``); raises GraphUnsupported with torch.export's reason when the model cannot be captured."""
    import time

    start = time.perf_counter()
    wrapper = BatchLoss(model, loss_fn, own_loss, with_output)
    # distinct example tensors: an input that aliases another (labels = input_ids) must not be merged
    example = pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, inputs)
    try:
        with warnings.catch_warnings():  # torch.export's own deprecation notices are not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            with grouped_experts(model):  # mixture-of-experts layers in a form export can capture
                exported = torch.export.export(wrapper, example, strict=False)
            exported = exported.run_decompositions({})
    except Exception as exc:  # torch.export reports many kinds of failure; the fallback says which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphUnsupported(f"torch.export could not capture the model ({type(exc).__name__}: {first[:300]})") from None
    signature_ = exported.graph_signature
    outputs = signature_.output_specs
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in outputs):
        kinds = sorted({spec.kind.name for spec in outputs if spec.kind != OutputKind.USER_OUTPUT})
        raise GraphUnsupported(f"the model changes its own state during the forward pass ({', '.join(kinds)})")
    graph = exported.graph_module.graph
    names = dict(wrapper.named_parameters(remove_duplicate=False))
    buffers = dict(wrapper.named_buffers(remove_duplicate=False))
    placeholders = []
    user = 0
    for spec in signature_.input_specs:
        if spec.kind == InputKind.PARAMETER:
            placeholders.append(("param", names[spec.target]))
        elif spec.kind == InputKind.BUFFER:
            placeholders.append(("buffer", buffers[spec.target]))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            placeholders.append(("constant", exported.constants[spec.target]))
        elif spec.kind == InputKind.USER_INPUT:
            placeholders.append(("input", user))
            user += 1
        else:
            raise GraphUnsupported(f"the captured graph takes a {spec.kind.name} input")
    output_node = next(n for n in graph.nodes if n.op == "output")
    results = output_node.args[0]
    loss_node = results[0] if isinstance(results, (tuple, list)) else results
    value = loss_node.meta.get("val") if isinstance(loss_node, torch.fx.Node) else None
    if value is None or not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise GraphUnsupported("the captured loss is not a scalar tensor")
    output = results[1] if with_output else None
    if with_output and not isinstance(output, torch.fx.Node):
        raise GraphUnsupported("the model's output is not a tensor computed in the captured graph")
    return Captured(graph, placeholders, loss_node, time.perf_counter() - start, output)
