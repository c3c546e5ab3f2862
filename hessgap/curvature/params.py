"""Which parameters a call differentiates with respect to: all trainable ones, or the ones named by ``params=``.

``params`` restricts the Hessian (and sharpness's box) to some parameters, the others held fixed. It takes
parameter names (``"h.0.attn.c_attn.weight"``; a tied parameter by any of its names), module names
(``"h.0.attn"``: all of that module's trainable parameters), parameter tensors, submodules (their
trainable parameters), or a list mixing them. The selection keeps the
model's ``named_parameters()`` order, which is also the order of the flat n-vectors.

:func:`parameter_blocks` cuts the trainable parameters into named blocks (one per module that owns
parameters, or one per parameter tensor) for the per-block spectra.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import HessgapError


def _check_uniform(named: list[tuple[str, nn.Parameter]]) -> None:
    first_name, first = named[0]
    for name, p in named:
        if p.device != first.device:
            raise HessgapError(
                f"parameters are on several devices ({first_name} on {first.device}, {name} on {p.device}); "
                "move the model to one device with model.to(device)"
            )
        if p.dtype != first.dtype:
            raise HessgapError(
                f"parameters have several dtypes ({first_name} is {first.dtype}, {name} is {p.dtype}); "
                "cast the model to one dtype with model.to(dtype)"
            )
        if not p.dtype.is_floating_point:
            raise HessgapError(f"parameter {name} has non-floating dtype {p.dtype}")


def select_parameters(model: nn.Module, params=None) -> tuple[list[str], list[nn.Parameter]]:
    """Names and tensors of the parameters a call works on, in ``named_parameters()`` order."""
    if not isinstance(model, nn.Module):
        raise HessgapError(f"expected a torch.nn.Module, got {type(model).__name__}")
    every = list(model.named_parameters())
    if params is None:
        named = [(n, p) for n, p in every if p.requires_grad]
        if not named:
            raise HessgapError(
                "the model has no trainable parameters (every parameter has requires_grad=False); "
                "unfreeze the parameters whose curvature you want"
            )
    else:
        chosen = _resolve(model, every, params)
        frozen = [n for n, p in every if id(p) in chosen and not p.requires_grad]
        if frozen:
            raise HessgapError(
                f"params= names frozen parameters ({', '.join(frozen[:4])}{', ...' if len(frozen) > 4 else ''}, "
                "requires_grad=False); unfreeze them with p.requires_grad_(True) or leave them out of params="
            )
        named = [(n, p) for n, p in every if id(p) in chosen]
    _check_uniform(named)
    return [n for n, _ in named], [p for _, p in named]


def reselect(model: nn.Module, names: list[str], params: list[nn.Parameter]) -> list[nn.Parameter] | None:
    """The parameters under ``names`` again when the model now holds other Parameter objects there than
    ``params`` (``load_state_dict(..., assign=True)``, ``module.weight = nn.Parameter(...)``, a new module),
    else None. The new ones must match the old ones in shape, dtype and device: a call that selected them (a
    HessianOperator) has fixed the length of its vectors."""
    current = dict(model.named_parameters(remove_duplicate=False))
    if all(current.get(name) is p for name, p in zip(names, params)):
        return None
    try:
        new_names, new = select_parameters(model, names)
    except HessgapError as exc:
        raise HessgapError(f"the model's parameters were replaced since this operator was built: {exc}") from None
    changed = [name for name, a, b in zip(new_names, params, new)
               if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device)]
    if new_names != names or changed:
        raise HessgapError(
            f"the model's parameters were replaced by ones of another shape, dtype or device "
            f"({', '.join(changed[:3]) or 'other names'}); an operator's size is fixed when it is built: build a new "
            "HessianOperator for the changed model"
        )
    return new


def _resolve(model: nn.Module, every: list[tuple[str, nn.Parameter]], params) -> set[int]:
    """ids of the parameters ``params`` names (see the module docstring).

    A module (by name or object) stands for its trainable parameters; a parameter named or passed itself
    must be trainable (:func:`select_parameters` says so). A tied parameter answers to every name it has
    (``lm_head.weight`` is ``transformer.wte.weight`` in a GPT-2), although ``named_parameters()`` lists
    it once.
    """
    if isinstance(params, (str, torch.Tensor, nn.Module)):
        items = [params]
    elif isinstance(params, Iterable):
        items = list(params)
    else:
        raise HessgapError(
            f"params= is a {type(params).__name__}; give parameter or module names, parameters or modules "
            "(one, or a list of them)"
        )
    if not items:
        raise HessgapError("params= is empty; name at least one parameter or module, or leave params=None for all")
    by_name = dict(model.named_parameters(remove_duplicate=False))  # tied parameters under each of their names
    modules = dict(model.named_modules())
    owned = {id(p) for _, p in every}
    chosen: set[int] = set()
    for item in items:
        if isinstance(item, str):
            if item in by_name:
                chosen.add(id(by_name[item]))
            elif item in modules and list(modules[item].parameters()):
                chosen.update(_trainable_of(modules[item], repr(item)))
            else:
                close = difflib.get_close_matches(item, list(by_name) + list(modules), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise HessgapError(
                    f"params= names {item!r}, which is neither a parameter nor a module with parameters of the "
                    f"model{hint}; see model.named_parameters()"
                )
        elif isinstance(item, nn.Module):
            found = [id(p) for p in item.parameters()]
            if not found or not set(found) <= owned:
                raise HessgapError(
                    f"params= holds a {type(item).__name__} that is not a submodule with parameters of this model"
                )
            chosen.update(_trainable_of(item, f"a {type(item).__name__}"))
        elif isinstance(item, torch.Tensor):
            if id(item) not in owned:
                raise HessgapError(
                    f"params= holds a tensor of shape {tuple(item.shape)} that is not a parameter of this model "
                    "(pass the parameter itself, e.g. model.fc.weight, not a copy)"
                )
            chosen.add(id(item))
        else:
            raise HessgapError(
                f"params= holds a {type(item).__name__}; give parameter or module names, parameters or modules"
            )
    return chosen


def _trainable_of(module: nn.Module, what: str) -> list[int]:
    found = [id(p) for p in module.parameters() if p.requires_grad]
    if not found:
        raise HessgapError(
            f"params= names module {what}, which has no trainable parameters (all have requires_grad=False); "
            "unfreeze them or choose another module"
        )
    return found


BLOCK_KINDS = ("module", "parameter")


def _label(model: nn.Module, item) -> str:
    """A block's name for an entry of a blocks= list: the name itself, or the name the model gives a module
    or parameter passed as an object."""
    if isinstance(item, str):
        return item
    named = model.named_modules() if isinstance(item, nn.Module) else model.named_parameters()
    for name, value in named:
        if value is item:
            return name or "(root)"
    return str(item)


def parameter_blocks(model: nn.Module, names: list[str], blocks="module") -> dict[str, list[int]]:
    """Named blocks of the selected parameters: ``{block name: positions in names}``.

    ``blocks="module"``: one block per module that owns parameters directly (a Linear's weight and bias
    together); ``"parameter"``: one per parameter tensor; or a dict ``{block name: params spec}`` /
    a list of module names, each resolved as ``params=`` is.
    """
    position = {n: i for i, n in enumerate(names)}
    if isinstance(blocks, str):
        if blocks not in BLOCK_KINDS:
            raise HessgapError(f"blocks must be one of {', '.join(BLOCK_KINDS)}, a list of module names or a dict, got {blocks!r}")
        out: dict[str, list[int]] = {}
        for n in names:
            key = n if blocks == "parameter" else (n.rsplit(".", 1)[0] if "." in n else "(root)")
            out.setdefault(key, []).append(position[n])
        return out
    if isinstance(blocks, dict):
        spec = blocks
    elif isinstance(blocks, (list, tuple)):
        spec = {_label(model, b): b for b in blocks}
    else:
        raise HessgapError(
            f"blocks= is a {type(blocks).__name__}; give 'module', 'parameter', a list of module names (or "
            "modules), or a dict {block name: parameters}"
        )
    if not spec:
        raise HessgapError("blocks= is empty; name at least one block")
    out = {}
    every = list(model.named_parameters())
    for block, chosen_spec in spec.items():
        ids = _resolve(model, every, chosen_spec)
        members = [position[n] for n, p in every if id(p) in ids and n in position]
        if not members:
            raise HessgapError(f"block {block!r} holds none of the parameters this call works on")
        out[str(block)] = members
    return out
