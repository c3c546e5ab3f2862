"""Loss and accuracy of a model over a loader, in eval mode: what the training loop records every epoch."""

from __future__ import annotations

import torch
from torch import nn

from ..curvature.objective import LossOverData


def evaluate(model: nn.Module, loader, loss_fn=None) -> tuple[float, float]:
    """(mean loss, accuracy in [0, 1]) of ``model`` in eval mode over every batch of ``loader``.

    A non-finite loss is returned as it is (NaN or inf), not raised: the training loop decides what a
    diverged run does. Every module's own train/eval mode is restored, also on error (a caller may keep
    one submodule in eval mode inside a model in train mode).
    """
    objective = LossOverData(model, loader, loss_fn=loss_fn)
    # evaluation changes no weights, so only the modes are saved (not the parameters, as _state.preserved does)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=objective.device)
    correct = torch.zeros((), dtype=torch.int64, device=objective.device)
    count = 0
    try:
        with torch.no_grad():
            for index, (inputs, targets) in enumerate(objective.batches()):
                outputs = model(inputs)
                loss = objective.batch_loss(outputs, targets, index)
                total += loss.double() * inputs.shape[0]
                if targets.dim() == 1 and outputs.dim() == 2:
                    correct += (outputs.argmax(1) == targets).sum()
                count += inputs.shape[0]
    finally:
        for module, mode in modes:
            module.training = mode
    return float(total) / count, int(correct) / count
