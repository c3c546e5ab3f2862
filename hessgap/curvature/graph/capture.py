"""Capturing one batch's loss as an ATen graph: ``torch.export.export(strict=False)``, with the batch's sizes
or with dynamic batch and sequence sizes.

The captured function is ``(args, kwargs, targets) -> the batch's mean loss``: the model called as the
batch says (``model(*args, **kwargs)``), then ``loss_fn(outputs, targets)`` or the output's own ``.loss``
(Hugging Face). Parameters and buffers become graph inputs, so one capture serves every parameter value.
The batch's structure, dtypes and non-tensor values are fixed by a capture and make up its key
(:func:`structure`); its sizes need not be:

- **dynamic sizes** (:func:`dynamic_shapes`): the batch dimension and the sequence dimensions of every
  input tensor (token ids, attention masks, targets) are exported as ``Dim.AUTO``, so one capture serves
  a loader of ragged batches. torch.export makes a size a number where the model needs it to be one (a size
  of 1, features a weight is multiplied with) and records the ranges and relations it relies on (at most
  the model's positions, one label per token): :class:`~.shapes.Sizes` checks them for every new batch
  shape, and a batch outside them needs a capture of its own. When export fails with dynamic sizes, the
  model is captured with the batch's static sizes and ``static_reason`` says why. :mod:`.plan` decides
  which a capture gets (static for a single batch: it costs a third of a dynamic one);
- **functional graph**: export's graph is functional ATen already unless the model writes into tensors in
  place (``x += y``, ``masked_fill_``) or runs regions under autocast or no_grad; only then does
  ``run_decompositions({})`` (a second trace, as long as the export itself) functionalize it. Either way
  the high-level ops the rules are written for stay whole: linear, conv, layer_norm, rms_norm,
  group_norm, scaled_dot_product_attention, cross_entropy_loss.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from ..batches import Batch
from ..objective import output_tensor
from .experts import grouped_experts
from .rules import RULES, GraphUnsupported
from .rules.base import describe
from .shapes import Sizes

aten = torch.ops.aten


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


def structure(inputs) -> tuple:
    """A capture's key: the structure, each tensor's dimensions, dtype, device and requires_grad, and every
    other value (the sizes are not: a capture with dynamic sizes serves several)."""
    leaves, spec = pytree.tree_flatten(inputs)
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", leaf.dim(), leaf.dtype, str(leaf.device), leaf.requires_grad))
        else:
            parts.append(("value", type(leaf).__name__, repr(leaf)))
    return (str(spec), tuple(parts))


def sizes(leaves) -> tuple:
    """The sizes of a batch's tensors (``leaves``: the flattened inputs): with :func:`structure`, the key of
    a graph made concrete for them."""
    return tuple(tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else None for leaf in leaves)


def dynamic_shapes(inputs):
    """``Dim.AUTO`` for the batch and sequence dimensions of every input tensor: every dimension of an
    integer or boolean tensor (token ids, masks, class or token targets, positions) and the first two of a
    floating one ((batch, features), (batch, time, features), (batch, channels, height, width): image sizes
    stay fixed, as loaders resize images to one size). Export turns a dimension the model fixes (features,
    channels) back into a number; a size of 1 stays one (export would make it a number anyway)."""
    def dims(leaf):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            return None
        count = min(leaf.dim(), 2) if leaf.is_floating_point() else leaf.dim()
        return {d: torch.export.Dim.AUTO for d in range(count) if leaf.shape[d] > 1} or None

    return pytree.tree_map(dims, inputs)


@dataclass
class Captured:
    """A functional graph of the batch loss and what each of its placeholders stands for.

    ``sizes`` holds the symbolic sizes of a capture with dynamic shapes (None for static ones), and
    ``static_reason`` why a capture has static sizes although dynamic ones were tried. ``programs`` keeps the
    graph made concrete and compiled for each batch shape seen (see :mod:`.plan`).
    """

    graph: torch.fx.Graph
    placeholders: list  # per placeholder, in order: ("param"|"buffer"|"constant", tensor) or ("input", leaf index)
    loss_node: torch.fx.Node
    seconds: float = 0.0
    sizes: Sizes | None = None
    example_sizes: tuple = ()  # the sizes of the batch it was made from: all a static capture serves
    static_reason: str | None = None
    programs: OrderedDict = field(default_factory=OrderedDict)
    output_node: torch.fx.Node | None = None  # the model's output tensor, when captured ``with_output``

    @property
    def dynamic(self) -> bool:
        return self.sizes is not None

    @property
    def how(self) -> str:
        """How the capture was made, for a result's notes."""
        if self.dynamic:
            return "dynamic batch and sequence sizes"
        if self.static_reason:
            return f"static sizes, one capture per batch shape ({self.static_reason})"
        return "the batch's static sizes"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _export(wrapper: nn.Module, inputs, dynamic: bool):
    # Fresh example tensors for every export: distinct ones (an input that aliases another, labels =
    # input_ids, must not be merged), and unmarked (an export with dynamic sizes marks its examples' dimensions
    # dynamic, which a later static export of the same tensors would follow).
    example = pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, inputs)
    # With gradients enabled, as autograd runs the model: its own torch.no_grad() regions then show in the graph
    # (under the engine's no_grad they would vanish, and the R-passes would differentiate through them).
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's deprecation notices are not the user's
        warnings.simplefilter("ignore", UserWarning)
        with grouped_experts(wrapper.model):  # mixture-of-experts layers in a form export can capture
            return torch.export.export(wrapper, example,
                                       dynamic_shapes=dynamic_shapes(example) if dynamic else None, strict=False)


def _needs_decompositions(graph: torch.fx.Graph) -> bool:
    """Whether export's graph must be functionalized (in-place writes, autocast or no_grad regions) or holds an
    op the rules lack that decompositions might turn into ops they have."""
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):  # the bodies of higher-order ops
            return True
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            return True
        if not isinstance(target, torch._ops.OpOverload) or target is aten.detach_.default:
            continue  # getitem, arithmetic on sizes; detach_ only drops autograd history, which no pass uses
        if target._schema.is_mutable:
            return True
        value = node.meta.get("val")
        if (target not in RULES and _floating(value)  # a tensor, or several (chunk, split)
                and torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd")):
            return True
    return False


def _floating(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_floating(v) for v in value)
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _dependents(graph: torch.fx.Graph, sources: set) -> set:
    """The nodes of ``graph`` whose floating values are computed from those of ``sources`` (sizes read from a
    tensor do not count: a rotary table shaped like the activations does not depend on their values)."""
    found = set(sources)
    for node in graph.nodes:
        if node not in found and _floating(node.meta.get("val")) and any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def _check_no_grad_regions(exported) -> None:
    """Refuse a model that runs part of its forward under ``torch.no_grad()`` on values computed from the
    parameters: autograd takes the region's results as constants, and the decomposed graph no longer says
    which they are (the R-passes would differentiate through them). Regions whose results come from the
    data or buffers only (positions, rotary tables) are constants either way."""
    region = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    regions = [n for n in exported.graph.nodes if region is not None and n.target is region and not n.args[0]]
    if not regions:
        return
    params = {spec.arg.name for spec in exported.graph_signature.input_specs if spec.kind == InputKind.PARAMETER}
    outer = _dependents(exported.graph, {n for n in exported.graph.find_nodes(op="placeholder") if n.name in params})
    for node in regions:
        body = getattr(exported.graph_module, node.args[1].target).graph
        inner = _dependents(body, {ph for ph, operand in zip(body.find_nodes(op="placeholder"), node.args[2:])
                                   if operand in outer})
        results = body.find_nodes(op="output")[0].all_input_nodes
        if any(r in inner for r in results):
            raise GraphUnsupported(
                f"{describe(node)}: the model runs part of its forward under torch.no_grad() on values computed "
                "from the parameters, which autograd holds constant and the graph engine would differentiate")


def _functional(exported):
    """Export's graph, functionalized only where it needs to be (see the module docstring)."""
    _check_no_grad_regions(exported)
    if _needs_decompositions(exported.graph):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            return exported.run_decompositions({})
    for node in exported.graph.nodes:
        if node.target is aten.detach_.default:
            node.target = aten.detach.default
    return exported


def capture(model: nn.Module, loss_fn, own_loss: bool, inputs, dynamic: bool = False,
            with_output: bool = False) -> Captured:
    """Export the batch loss of ``model`` on ``inputs`` = (args, kwargs, targets), with its sizes or, with
    ``dynamic``, with dynamic batch and sequence sizes where the model can be exported with them; raises
    GraphUnsupported with torch.export's reason when the model cannot be captured at all. ``with_output``:
    the model's output tensor is captured beside the loss (the Gauss-Newton split)."""
    start = time.perf_counter()
    wrapper = BatchLoss(model, loss_fn, own_loss, with_output)
    leaves = pytree.tree_leaves(inputs)
    captured, static_reason = None, None
    if dynamic and any(isinstance(t, torch.Tensor) and t.dim() > 0 and max(t.shape) > 1 for t in leaves):
        try:
            captured = _captured(_functional(_export(wrapper, inputs, dynamic=True)), wrapper, with_output)
        except Exception as exc:  # noqa: BLE001 - any failure with dynamic sizes leaves the static capture
            static_reason = f"torch.export failed with dynamic sizes ({type(exc).__name__}: {_first_line(exc)})"
        else:
            if captured.sizes is not None and captured.sizes.bind(leaves) is None:
                # a guard in sizes that are no input's would refuse every batch, this one included
                captured, static_reason = None, "its size guards are not in the inputs' sizes"
    if captured is None:
        try:
            exported = _functional(_export(wrapper, inputs, dynamic=False))
        except Exception as exc:  # torch.export reports many kinds of failure; the fallback says which
            raise GraphUnsupported(
                f"torch.export could not capture the model ({type(exc).__name__}: {_first_line(exc)})") from None
        captured = _captured(exported, wrapper, with_output)
        captured.static_reason = static_reason
    captured.example_sizes = sizes(leaves)
    captured.seconds = time.perf_counter() - start
    return captured


def _captured(exported, wrapper: nn.Module, with_output: bool = False) -> Captured:
    signature_ = exported.graph_signature
    outputs = signature_.output_specs
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in outputs):
        kinds = sorted({spec.kind.name for spec in outputs if spec.kind != OutputKind.USER_OUTPUT})
        raise GraphUnsupported(f"the model changes its own state during the forward pass ({', '.join(kinds)})")
    graph = exported.graph_module.graph
    # without decompositions nothing removed the values no output needs (a Hugging Face model's own loss beside
    # a loss_fn's): they would cost a primal pass and hide the LM head's single use from its fusion
    graph.eliminate_dead_code()
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
    inputs = [node for node, (kind, _) in zip(graph.find_nodes(op="placeholder"), placeholders) if kind == "input"]
    return Captured(graph, placeholders, loss_node, sizes=Sizes.of(exported, inputs), output_node=output)
