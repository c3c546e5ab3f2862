"""The Lightning callback: curvature every N optimizer steps, logged through the module's ``log``.

    from hessgap.integrations.lightning import HessgapCallback

    trainer = lightning.Trainer(max_steps=1000, callbacks=[HessgapCallback(batches, every=50)])
    trainer.fit(module, train_loader)
    trainer.logged_metrics["hessgap/lambda_max"]

``batches`` are the tracked data, as the module's model takes them (the module's own ``forward`` is called with
each batch's inputs; pass ``loss_fn`` or ``compute_loss=lambda module, batch: ...`` for another loss than
cross-entropy); on several ranks, each rank's shard. When the trainer's global step reaches a multiple of
``every``, the callback runs a :class:`hessgap.Tracker` on the module and its first optimizer (weights,
optimizer state and random streams are left as they were) and logs ``hessgap/<measure>`` and ``hessgap/hvps``
with ``pl_module.log(..., on_step=True)``: they are in ``trainer.callback_metrics`` at once and reach the loggers
(``trainer.logged_metrics``, TensorBoard, W&B, CSV) at Lightning's next logging step, so choose ``every`` as a
multiple of the trainer's ``log_every_n_steps`` (the callback warns otherwise). Under DDP every rank measures its
shard together with the others (one shared record) and rank 0 logs (``rank_zero_only``).
"""

from __future__ import annotations

import warnings

from ..errors import HessgapError
from ..tracking import Tracker
from ._logged import logged_values

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone pytorch_lightning package has the same callback API
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise HessgapError("hessgap.integrations.lightning needs Lightning (pip install lightning)") from exc


class HessgapCallback(Callback):
    """Run a :class:`hessgap.Tracker` inside ``Trainer.fit`` and log its values (see the module docstring).

    ``every``, ``measures``, ``out`` and ``tracker_options`` (``tol``, ``trace_probes``, ``epsilon``,
    ``critical_tol``, ``line_data``, ``max_batches``, ``loss_fn``, ``compute_loss``, ...) go to the tracker;
    the model is the LightningModule and the optimizer its first one.
    """

    def __init__(self, data, *, every: int = 100, measures=("lambda_max",), out=None, **tracker_options):
        self.data, self.every, self.measures, self.out = data, every, measures, out
        self.tracker_options = tracker_options
        self.tracker: Tracker | None = None
        self._last_step: int | None = None

    def on_train_start(self, trainer, pl_module):
        if self.tracker is not None:
            return
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        self.tracker = Tracker(pl_module, self.data, every=self.every, measures=self.measures,
                               optimizer=optimizers[0] if optimizers else None, out=self.out, **self.tracker_options)
        log_every = getattr(trainer, "log_every_n_steps", None)
        if log_every and self.every % log_every:
            warnings.warn(
                f"HessgapCallback measures every {self.every} steps but the trainer sends metrics to its loggers "
                f"every {log_every} steps; values of steps between reach callback_metrics only: make every a multiple "
                "of log_every_n_steps", RuntimeWarning, stacklevel=2,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = int(trainer.global_step)
        if step == self._last_step:  # gradient accumulation: several batches per optimizer step
            return
        self._last_step = step
        record = self.tracker.step(step)
        if record is None:
            return
        for name, value in logged_values(record).items():
            pl_module.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module):
        if self.tracker is not None:
            self.tracker.close()
