"""What decides a landscape's numbers, as digests: a run folder stores them and resumes only when they match,
and the ranks of a distributed call compare them before any work.

- a model: sha256 of its parameters (names, trainable or not, dtypes, shapes and every byte) and, apart, of
  its buffers (BatchNorm's running statistics), so that an error can say which of the two changed;
- given direction tensors: sha256 of their bytes;
- the data: sha256 over every batch a pass uses (after ``max_batches``, moved and cast as they are
  evaluated): each tensor's place in the batch, dtype, shape and bytes, batch after batch, so another batch
  size counts as other data (BatchNorm's batch statistics depend on it); on several ranks the ranks'
  digests in rank order. Hashing every byte is cheap next to the landscape itself: MNIST's 188 MB of
  training images take 0.13 s, one forward pass over them far longer, and a landscape makes hundreds;
- the loss function: see :func:`loss_identity`.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import numbers
import types
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

#: Prefix of a loss identity that hessgap cannot check (a closure over an object it cannot fingerprint)
UNVERIFIABLE = "unverifiable: "
_DEPTH = 8  # how deep values inside values are followed (a closure may refer to itself)


def _add_tensor(hasher, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    hasher.update(f"{t.dtype} {tuple(t.shape)}|".encode())
    hasher.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and bytes, in the given order."""
    hasher = hashlib.sha256()
    for name, tensor in tensors:
        hasher.update(f"{name}:".encode())
        _add_tensor(hasher, tensor)
    return hasher.hexdigest()


def model_digest(model: nn.Module) -> dict[str, str]:
    """{"parameters": sha256, "buffers": sha256} of a model's state (which parameters are trainable counts)."""
    return {"parameters": tensor_digest((f"{name} {p.requires_grad}", p) for name, p in model.named_parameters()),
            "buffers": tensor_digest(model.named_buffers())}


def _add_structure(hasher, value) -> None:
    """A batch of any structure: containers by their keys and order, tensors by content, other leaves by type
    and (for plain values) repr."""
    if isinstance(value, torch.Tensor):
        _add_tensor(hasher, value)
    elif isinstance(value, Mapping):
        hasher.update(b"{")
        for key, item in value.items():
            hasher.update(f"{key!r}:".encode())
            _add_structure(hasher, item)
        hasher.update(b"}")
    elif isinstance(value, (tuple, list)):
        hasher.update(b"[")
        for item in value:
            _add_structure(hasher, item)
        hasher.update(b"]")
    else:
        plain = value is None or isinstance(value, (bool, int, float, str))
        hasher.update(f"{type(value).__name__}:{value!r}|".encode() if plain else f"{type(value).__name__}|".encode())


def data_digest(objective) -> str:
    """sha256 of the batches one pass of ``objective`` (a :class:`~hessgap.curvature.objective.LossOverData`)
    reads, over every rank's shard. A collective: every rank must call it."""
    hasher = hashlib.sha256()

    def walk():
        for index, raw in enumerate(objective.source):
            hasher.update(f"batch {index}|".encode())
            _add_structure(hasher, raw)

    objective.ranks.together(walk)
    digests = objective.ranks.gather_object(hasher.hexdigest())
    return digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()


# -- the loss function -----------------------------------------------------------------------------------


def _name(obj) -> str:
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _code_digest(code: types.CodeType) -> str:
    """sha256 of what a code object computes: its bytecode, constants (nested code too) and the names it uses;
    not its file name or line numbers, so the same function defined elsewhere is the same."""
    hasher = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        hasher.update((_code_digest(const) if isinstance(const, types.CodeType) else repr(const)).encode())
    hasher.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    return hasher.hexdigest()[:16]


def _value(value, depth: int = 0) -> str | None:
    """A stable text for a value a loss function holds (numbers, strings, tensors, arrays, dtypes, functions,
    containers of them); None for anything else (its repr may hold a memory address, or it may hide state)."""
    if depth > _DEPTH:
        return None
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        try:
            return f"tensor sha256:{tensor_digest([('', torch.as_tensor(value))])[:16]}"
        except (TypeError, RuntimeError):  # arrays of Python objects
            return None
    if isinstance(value, (tuple, list)):
        items = [_value(v, depth + 1) for v in value]
        return None if None in items else "[" + ", ".join(items) + "]"
    if isinstance(value, Mapping):
        items = {k: _value(v, depth + 1) for k, v in value.items()}
        return None if None in items.values() else "{" + ", ".join(f"{k!r}: {v}" for k, v in items.items()) + "}"
    if isinstance(value, (types.ModuleType, type)):
        return getattr(value, "__name__", None) if isinstance(value, types.ModuleType) else _name(value)
    if callable(value):
        identity = _identity(value, depth + 1)
        return None if identity.startswith(UNVERIFIABLE) else identity
    return None


def _attributes(obj, depth: int) -> str | None:
    """An object's public attributes as text (None when one of them has no stable text)."""
    attributes = {k: v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and k != "training"}
    return _value(attributes, depth + 1)


def loss_identity(loss_fn) -> str:
    """A text that changes when the loss function computes something else (as far as hessgap can tell).

    - None: "default" (cross-entropy, or the output's ``.loss``);
    - an ``nn.Module`` (``nn.CrossEntropyLoss(label_smoothing=0.1)``) or another callable object: its class,
      public attributes and tensors (class weights);
    - a function with an importable name (``F.cross_entropy``, a module-level function of a package): that
      name. Editing its code between two runs is not noticed: a library's name is its contract;
    - a lambda, a nested function (a closure) or a function of ``__main__`` (a script or notebook, edited
      between runs more often than not): its bytecode and constants, its defaults and the values it closes
      over, when those are numbers, strings, tensors, arrays, functions or modules (by class, attributes and
      state). The globals it reads are not covered. One that closes over anything else (an open file, a random
      generator) gets an identity starting with :data:`UNVERIFIABLE`: a run folder then refuses to resume,
      as nothing tells whether it is the same;
    - ``functools.partial``: the function and its bound arguments, as above.
    """
    return _identity(loss_fn, 0)


def _identity(loss_fn, depth: int) -> str:
    if depth > _DEPTH:  # a function that closes over itself
        return f"{UNVERIFIABLE}{_name(loss_fn)} refers to itself"
    if loss_fn is None:
        return "default"
    if isinstance(loss_fn, functools.partial):
        parts = [_identity(loss_fn.func, depth + 1), _value(list(loss_fn.args), depth + 1),
                 _value(dict(loss_fn.keywords), depth + 1)]
        if None in parts or parts[0].startswith(UNVERIFIABLE):
            return f"{UNVERIFIABLE}functools.partial of {_name(loss_fn.func)} with arguments hessgap cannot fingerprint"
        return f"functools.partial({parts[0]}, *{parts[1]}, **{parts[2]})"
    if isinstance(loss_fn, nn.Module) or not inspect.isroutine(loss_fn):
        attributes = _attributes(loss_fn, depth) if hasattr(loss_fn, "__dict__") else "{}"
        if attributes is None:
            return f"{UNVERIFIABLE}a {_name(type(loss_fn))} whose attributes hessgap cannot fingerprint"
        state = loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else {}
        tensors = f", state sha256:{tensor_digest(state.items())[:16]}" if state else ""
        return f"{_name(type(loss_fn))}({attributes}{tensors})"
    name = _name(loss_fn)
    code = getattr(loss_fn, "__code__", None)
    if code is None or not ("<lambda>" in name or "<locals>" in name or loss_fn.__module__ == "__main__"):
        return name  # a builtin, or a function with an importable name
    try:
        cells = [cell.cell_contents for cell in loss_fn.__closure__ or ()]
    except ValueError:  # a variable of the enclosing function not assigned yet
        return f"{UNVERIFIABLE}{name} closes over a variable that has no value yet"
    captured = _value([cells, loss_fn.__defaults__, loss_fn.__kwdefaults__], depth + 1)
    if captured is None:
        kinds = ", ".join(sorted({type(c).__name__ for c in cells if _value(c, depth + 1) is None}))
        return f"{UNVERIFIABLE}{name} closes over {kinds or 'a default argument'}, which hessgap cannot fingerprint"
    return f"{name} (code sha256:{_code_digest(code)}, closure and defaults {captured})"


def describe(value, digests: dict[int, dict[str, str]] | None = None):
    """A small, comparable description of any argument (models and tensors by their digests, callables by
    :func:`loss_identity`), for the ranks to compare; never raises. ``digests`` memoizes models' digests by id."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, numbers.Number):  # numpy scalars and the like
        return repr(value)
    try:
        if isinstance(value, nn.Module):
            digests = {} if digests is None else digests
            if id(value) not in digests:
                digests[id(value)] = model_digest(value)
            found = digests[id(value)]
            return f"{type(value).__name__} (parameters {found['parameters'][:16]}, buffers {found['buffers'][:16]})"
        if isinstance(value, torch.Tensor):
            return f"tensor {tuple(value.shape)} {value.dtype} sha256:{tensor_digest([('', value)])[:16]}"
    except Exception as exc:  # a tensor that cannot be read here (meta, sharded): compared by its type alone
        return f"{type(value).__name__} (no digest: {type(exc).__name__})"
    if isinstance(value, (tuple, list)):
        return [describe(v, digests) for v in value]
    if isinstance(value, Mapping):
        return {str(k): describe(v, digests) for k, v in value.items()}
    if callable(value):
        return loss_identity(value)
    text = _value(value)
    return text if text is not None else type(value).__name__
