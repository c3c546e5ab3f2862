"""The fused R-operator engine: exact Hessian-vector products for k directions in one forward-over-reverse pass.

Pearlmutter's R-operator R{·} = d/dt (·)(θ + t v) at t = 0, applied to the forward pass and to the
backward pass of a plain layer stack, gives R{∂L/∂θ} = H v. For one batch the engine

1. runs the forward and the first-order backward once (activations x_l and output gradients g_l), then
2. for each chunk of k directions runs R-forward (R{x_l}) and R-backward (R{g_l}, R{∂L/∂θ_l}) with all k
   directions stacked along the batch dimension, so every matrix product is one large BLAS / conv call on
   (k·B, ...) tensors, and the element-wise second-order pieces (activation σ', σ''; the softmax
   cross-entropy Hessian) are the fused kernels of :mod:`hessgap.ops.hvp_pointwise`.

Supported: an ``nn.Sequential`` (nested ones too) of Linear, Conv2d (groups=1, zero padding), ReLU,
LeakyReLU, Tanh, Sigmoid, GELU, BatchNorm1d/2d with running statistics (eval mode), MaxPool2d, AvgPool2d,
Flatten, Unflatten, Dropout and Identity (eval mode), with ``nn.CrossEntropyLoss`` (mean, no class weights, no label
smoothing, class-index targets) or ``nn.MSELoss`` (mean). :func:`plan` raises :class:`FusedUnsupported`
naming the first thing it cannot handle; callers then take the generic torch.func path.

Shapes: a primal tensor has shape (B, ...); its R-counterpart has shape (k, B, ...).

Layout: :mod:`.base` (the rule interface, :class:`FusedUnsupported`), :mod:`.dense` (Linear, Conv2d),
:mod:`.layers` (the rule for each module type; BatchNorm, activations, pooling, reshapes), :mod:`.losses`
(cross-entropy, MSE) and :mod:`.plan` (:func:`plan`, :class:`FusedPlan`, :class:`BatchState`).
"""

from .base import FusedUnsupported
from .plan import BatchState, FusedPlan, plan

__all__ = ["BatchState", "FusedPlan", "FusedUnsupported", "plan"]
