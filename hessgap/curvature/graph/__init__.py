"""The graph engine: exact Hessian-vector products for k directions over any model torch.export can capture.

The layer-stack engine (:mod:`hessgap.curvature.fused`) runs Pearlmutter's R-operator over a list of layers;
this engine runs it over the ATen graph of the batch loss, so residual networks and transformers
(Hugging Face models included) get the same forward-over-reverse pass: one primal forward and first-order
backward per batch, then for each chunk of k directions one R-forward and one R-backward with the
directions stacked along a leading dimension (batched BLAS and convolution calls, fused kernels for the
element-wise second-order pieces, LayerNorm/RMSNorm rows and attention).

**Capture** (:mod:`.capture`): ``torch.export.export(strict=False)`` of ``(args, kwargs, targets) -> mean
batch loss``, functionalized with ``run_decompositions({})``. Why this one:

- symbolic tracing (``torch.fx.symbolic_trace``) fails on Hugging Face models (control flow on shapes and
  configuration, ``**kwargs``, output dataclasses), which export's non-strict mode runs as plain Python;
- export gives ATen ops with the module structure recorded, keeps the composite ops a rule wants whole
  (``linear``, ``conv2d``, ``layer_norm``, ``rms_norm``, ``group_norm``, ``scaled_dot_product_attention``,
  ``cross_entropy_loss``: attention is one node the engine owns), and lifts parameters and buffers to graph
  inputs, so one capture serves every parameter value;
- it runs the model on fake tensors: control flow that depends on the *values* of the data fails the
  capture (and the model takes the generic path) instead of silently baking in one batch's branch, as a
  trace with real tensors (``make_fx``) would.

A capture is keyed by the batch's structure, shapes, dtypes and non-tensor values, and by the model's
modules, parameters and modes; :class:`GraphPlan` keeps up to a few signatures (the last, shorter batch of
a loader is a second one).

**Rules** (:mod:`.rules`): one per ATen op, bound to its node, with four passes: primal forward (saving
what the R-passes need), first-order vjp, R-forward (jvp of the k stacked tangents) and R-backward
(vjp of R{g} plus the second-order term). Only *active* nodes, those that depend on θ and lead to the loss,
need one; masks, positions and other constants run in the primal pass only. An active op without a rule,
an argument a rule cannot differentiate, or a model export cannot capture raises
:class:`GraphUnsupported` naming the op and the module it came from; the HVP engine then takes the generic
path for the model and reports the reason.

**Per-batch state** (:class:`~.program.GraphState`): like the layer engine's ``BatchState``, the primal pass
of a batch (the rules' saved tensors and the gradients their R-backward reads) is kept and reused by every
chunk of directions, and between calls when the batches are cached and the model has not changed.

Why the layer-stack engine stays: a plain ``nn.Sequential`` needs no capture (export costs from tenths of a
second to seconds per signature, and its first use in a process about two seconds), and its rules are
tuned per layer; it is tried first, this engine for everything else.
"""

from .plan import GraphPlan
from .program import GraphState, Program
from .rules import GraphUnsupported

__all__ = ["GraphPlan", "GraphState", "GraphUnsupported", "Program"]
