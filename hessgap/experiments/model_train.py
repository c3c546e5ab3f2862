"""``hessgap train``: one network trained into a run folder (checkpoints there; resumes), saved as
``model.pt`` for the commands on saved networks, with its training curves."""

from __future__ import annotations

from ..train import loop
from ..train.config import TrainConfig
from ..train.data import Dataset
from . import _figures as draw
from . import _markdown as md
from .runs import RunFolder
from .saved import MODEL_FILE

NAME = "train"


def run(folder: RunFolder, config: TrainConfig, data: Dataset | None = None) -> dict:
    """Train ``config`` into the run folder (checkpoints there; resumes), save ``model.pt``, write the result.
    ``data``: the configuration's data set, when the caller loaded it already."""
    folder.log(f"training {config.model} on {config.dataset}, batch {config.batch_size}, seed {config.seed}")
    result = loop.train(config, out_dir=folder.path, dataset=data, progress=folder.progress)
    result.save(folder.path / MODEL_FILE)
    summary = result.to_dict()
    out = {
        "experiment": NAME,
        "model": f"{config.model} on {config.dataset} (batch {config.batch_size}, seed {config.seed})",
        "config": summary["config"],
        "final": {k: v for k, v in summary["final"].items()},
        "history": summary["history"],
        "diverged": result.diverged,
        "stopped_early": result.stopped_early,
        "num_parameters": summary["num_parameters"],
        "model_file": MODEL_FILE,
    }
    out["figures"] = {"history": draw.history({"run": result.history}, folder.figure("history")).name}
    folder.save_result(NAME, out)
    return out


# --- its report section ------------------------------------------------------------------------------

def render(r: dict) -> str:
    final = r.get("final") or {}
    rows = [[f"{k} (%)", md.pct(100 * v)] if k.endswith("_acc") and v is not None else [k, md.fmt(v)]
            for k, v in final.items()]
    out = [f"## Training run {r.get('model', '')}", ""]
    if r.get("diverged") is not None:
        out.append(f"**Diverged at epoch {r['diverged']}** (non-finite training loss); checkpoints kept.")
    out += [md.table(["last epoch", "value"], rows), "", md.figure(r, "history", "training curves")]
    return "\n".join(out)
