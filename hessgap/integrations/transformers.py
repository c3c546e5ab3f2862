"""The Hugging Face ``Trainer`` callback: curvature every N optimizer steps, in the Trainer's own logs.

    from hessgap.integrations.transformers import HessgapCallback

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[HessgapCallback(batches, every=50, measures=("lambda_max", "critical_sharpness"))])
    trainer.train()
    trainer.state.log_history      # ... {"loss": ..., "hessgap/lambda_max": ..., "step": 50} ...

``batches`` are the tracked data: a few batches as the model takes them (dicts with ``labels``), a DataLoader
or one batch; on several ranks, each rank's shard. At every step that is a multiple of ``every`` the callback
runs a :class:`hessgap.Tracker` (warm-started, leaving weights, optimizer state and random streams as they
were), asks the Trainer to log at that step, and adds ``hessgap/<measure>`` (and ``hessgap/hvps``) to that log
entry: to ``trainer.state.log_history`` and to what every reporting callback receives (TensorBoard, W&B,
...), because the callback moves itself ahead of them when training begins. ``callback.tracker.history``
holds the full records. Under DDP every rank measures its shard together with the others (one shared
record) and the Trainer's reporters write from rank 0 as they always do; ``out=`` is written by rank 0.
"""

from __future__ import annotations

import inspect
import warnings

from ..errors import HessgapError
from ..tracking import Tracker
from ._logged import logged_values

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
except ImportError as exc:  # an optional dependency: say how to get it
    raise HessgapError(
        "hessgap.integrations.transformers needs the transformers package (pip install transformers accelerate)"
    ) from exc


class HessgapCallback(TrainerCallback):
    """Run a :class:`hessgap.Tracker` inside ``Trainer.train()`` and log its values (see the module docstring).

    ``every``, ``measures``, ``out`` and ``tracker_options`` (``tol``, ``trace_probes``, ``epsilon``,
    ``critical_tol``, ``line_data``, ``max_batches``, ``loss_fn``, ``compute_loss``, ...) go to the tracker;
    the model and the optimizer are the Trainer's.
    """

    def __init__(self, data, *, every: int = 100, measures=("lambda_max",), out=None, **tracker_options):
        self.data, self.every, self.measures, self.out = data, every, measures, out
        self.tracker_options = tracker_options
        self.tracker: Tracker | None = None
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _move_ahead_of_the_others(self, inspect.currentframe())
        if self.tracker is None:
            self.tracker = Tracker(model, self.data, every=self.every, measures=self.measures, optimizer=optimizer,
                                   out=self.out, **self.tracker_options)

    def on_step_end(self, args, state, control, **kwargs):
        record = self.tracker.step(state.global_step) if self.tracker is not None else None
        if record is not None:
            self._pending = logged_values(record)
            control.should_log = True  # a log entry at this step, which on_log fills in
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        # the Trainer appended its copy of the entry before the callbacks saw it
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.close()


def _move_ahead_of_the_others(callback, frame) -> None:
    """Put ``callback`` first among the Trainer's callbacks, so that the log entries it fills reach the reporting
    callbacks (which the Trainer registers before the user's) with its values in them.

    The Trainer passes callbacks neither itself nor its ``CallbackHandler``; the handler is the object whose
    ``call_event`` calls this hook, one frame up.
    """
    caller = frame.f_back if frame is not None else None
    handler = caller.f_locals.get("self") if caller is not None else None
    if isinstance(handler, CallbackHandler) and callback in handler.callbacks:
        handler.callbacks.remove(callback)
        handler.callbacks.insert(0, callback)
        return
    warnings.warn(
        "HessgapCallback could not find the Trainer's callback handler; its values reach only the callbacks "
        "registered after it (put it first: trainer.callback_handler.callbacks.insert(0, callback))",
        RuntimeWarning, stacklevel=3,
    )
