"""Leave a model exactly as it was: parameters bit for bit, buffers, gradients and train/eval modes; and leave
the random number generators as they were (:func:`preserved_rng`)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def preserved(model: nn.Module, train_mode: bool = False, parameters: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Run a block that perturbs ``model`` and put everything back afterwards, also on error.

    Inside the block the model is in eval mode (``train_mode=False``, the default: BatchNorm uses its running
    statistics and dropout is off) or in train mode. Yields a snapshot of the trainable parameters by
    name; callers use it as the centre x instead of keeping a second copy. ``parameters=False`` is for
    blocks that never write the parameters (Hessian-vector products): their values are then not copied
    (the snapshot is empty), only buffers, gradients and modes are restored.
    """
    params = {name: p for name, p in model.named_parameters()}
    saved_params = {name: p.detach().clone() for name, p in params.items()} if parameters else {}
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    saved_grads = {name: p.grad for name, p in params.items()}
    saved_modes = [(module, module.training) for module in model.modules()]
    try:
        model.train(train_mode)
        yield {name: saved_params[name] for name, p in params.items() if p.requires_grad and name in saved_params}
    finally:
        # Write through .data: the values come back bit for bit without bumping the tensors' version
        # counters, so an autograd graph the caller retained across the call stays usable.
        with torch.no_grad():
            for name, p in params.items():
                if name in saved_params:
                    p.data.copy_(saved_params[name])
                p.grad = saved_grads[name]
            for name, b in model.named_buffers():
                if name in saved_buffers:
                    b.data.copy_(saved_buffers[name])
        for module, mode in saved_modes:
            module.training = mode


@contextlib.contextmanager
def preserved_rng(devices: Iterable[torch.device] = ()) -> Iterator[None]:
    """Run a block that may draw random numbers and put every global generator back afterwards, also on error:
    Python's ``random``, numpy's global generator, torch's CPU generator and the CUDA generators of ``devices``.

    A measurement inside someone's training loop runs under it, so that the run continues with the very
    random streams (dropout, shuffling, augmentation) it would have drawn without the measurement.
    """
    cuda = sorted({torch.device(d).index or 0 for d in devices if torch.device(d).type == "cuda"})
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
