"""Mixture-of-experts layers of Hugging Face models, captured through their grouped implementation.

transformers 5 runs a model's experts by ``config._experts_implementation``:

- ``"eager"`` loops over the experts that received tokens (``nonzero``/``where`` on the routing): the number
  of iterations and the tensors' shapes depend on the data, which ``torch.export`` refuses;
- ``"batched_mm"`` gathers a copy of every token's expert weights (S × 2I × H numbers per layer), which the
  R-passes would copy again per direction;
- ``"grouped_mm"`` (the default) sorts the tokens by expert and runs one grouped product per projection: fixed
  shapes, captured as ``transformers::grouped_mm_fallback`` (or ``aten._grouped_mm``), whose rule runs one
  product per expert (:mod:`.rules.routing`).

All three compute the same function (the same products per token and expert, summed in another order), so
:func:`grouped_experts` switches a model's experts to ``"grouped_mm"`` while it is captured and back after;
the model itself keeps running its own implementation everywhere else (the generic path included).
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

#: implementations that compute the experts' function with another schedule than the grouped one
_SWITCHED = ("eager", "batched_mm")


def _experts_configs(model: nn.Module) -> list:
    """The configs read by the model's experts modules (those built by transformers' experts decorator)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "_is_expert_parallel") and hasattr(config, "_experts_implementation_internal"):
            configs[id(config)] = config
    return list(configs.values())


@contextmanager
def grouped_experts(model: nn.Module):
    """Within the block, the model's Hugging Face experts run their grouped implementation."""
    changed = []
    for config in _experts_configs(model):
        current = config._experts_implementation_internal
        if current in _SWITCHED:
            changed.append((config, current))
            # the internal field: the public setter would also rewrite sub-configs the block does not own
            config._experts_implementation_internal = "grouped_mm"
    try:
        yield
    finally:
        for config, previous in changed:
            config._experts_implementation_internal = previous
