"""Training for the paper's experiments: models F1–C4, data sets, the SB/LB loop with checkpoints, remedies.

    from hessgap.train import TrainConfig, train, load_dataset, build_model
    sb = train(TrainConfig(model="F1", dataset="digits", batch_size="sb", epochs=20), out_dir="runs/sb")
    lb = train(TrainConfig(model="F1", dataset="digits", batch_size="lb", epochs=20), out_dir="runs/lb")
"""

from .checkpoint import list_checkpoints, load_checkpoint, load_epoch_state
from .config import TrainConfig
from .data import DATASET_NAMES, SMALL_BATCH, Dataset, large_batch_size, load_dataset, make_loader
from .evaluation import evaluate
from .loop import train
from .models import MODEL_NAMES, build_model, count_parameters, parameter_count
from .remedies import REMEDIES, BatchSchedule, augment_batch, fgsm
from .result import TrainResult

__all__ = [
    "MODEL_NAMES", "build_model", "count_parameters", "parameter_count",
    "DATASET_NAMES", "Dataset", "load_dataset", "make_loader", "large_batch_size", "SMALL_BATCH",
    "TrainConfig", "TrainResult", "train", "evaluate",
    "list_checkpoints", "load_checkpoint", "load_epoch_state",
    "REMEDIES", "BatchSchedule", "augment_batch", "fgsm",
]
