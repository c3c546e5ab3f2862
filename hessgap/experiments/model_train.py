"""``hessgap train``: one network trained into a run folder (checkpoints there; resumes), saved as
``model.pt`` for the commands on saved networks, with its training curves and, with ``--track``, its curvature
step by step beside the loss."""

from __future__ import annotations

from .._io import write_bytes
from ..tracking.plot import render as render_tracking
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
    if result.tracking:
        out["tracking"] = [{k: v for k, v in r.items() if k != "weights_checksum"} for r in result.tracking]
        title = f"{config.model} on {config.dataset}, batch {config.batch_size}: curvature every {config.track_every} steps"
        out["figures"]["tracking"] = write_bytes(folder.figure("tracking"), render_tracking(result.tracking,
                                                                                           title=title)).name
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
    if r.get("tracking"):
        out += ["", tracking_section(r)]
    return "\n".join(out)


#: the record's entries shown in the report, in this order, when the run tracked them
TRACKED_COLUMNS = ("loss", "lambda_max", "critical_sharpness", "eos_ratio", "trace", "sharpness", "hvps", "seconds")


def tracking_section(r: dict, rows: int = 12) -> str:
    """The records of ``--track`` (at most ``rows``, spread over the run, the last one included) and their figure."""
    records = r["tracking"]
    shown = records if len(records) <= rows else [records[round(i * (len(records) - 1) / (rows - 1))]
                                                  for i in range(rows)]
    columns = [c for c in TRACKED_COLUMNS if any(c in record for record in records)]
    table = md.table(["step", *columns], [[record["step"], *(md.fmt(record.get(c)) for c in columns)]
                                          for record in shown])
    config = r.get("config", {})
    return "\n".join([
        f"### Curvature along training (every {config.get('track_every')} steps, over the first "
        f"{config.get('track_batches')} evaluation batches of the training set)", "",
        "λmax is the top Hessian eigenvalue (Lanczos, warm-started from the previous record), critical sharpness "
        "λc = 2/ηc the curvature the optimizer's next step meets (Kalra et al. 2026), eos_ratio λmax·η over "
        "SGD's stability limit; hvps counts the Hessian-vector products of a record.", "",
        table, "", md.figure(r, "tracking", "curvature along training, beside the loss"),
    ])
