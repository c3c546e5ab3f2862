"""The paper's choices as settings: the paper preset uses them, quick keeps hessgap's defaults, each reaches the
training runs and the measurements, and folders written before they existed still resume."""

import json

import pytest
import torch
from torch import nn

from hessgap.errors import HessgapError
from hessgap.experiments import RunFolder, networks, preset, reproduce
from hessgap.experiments.presets import ADDED_SETTINGS
from hessgap.experiments.runs import digest
from hessgap.train.config import ADDED_DEFAULTS

from tiny_runs import load_trained, tiny_settings

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_paper_preset_uses_the_papers_choices():
    paper = preset("paper")
    assert (paper.preprocess, paper.init, paper.conv_dropout) == ("none", "glorot", True)
    assert (paper.stop, paper.patience, paper.max_epochs) == ("plateau", 10, 500)
    assert (paper.sharpness_solver, paper.sharpness_batchnorm) == ("lbfgsb", "train")
    assert paper.warmstart_every == 1 and paper.warmstart_sb_epochs == paper.warmstart_lb_epochs == 100
    assert (paper.sb_batch, paper.lb_fraction, paper.seeds, paper.epsilons) == (256, 0.1, 5, (1e-3, 5e-4))
    quick = preset("quick")
    for name, value in ADDED_SETTINGS.items():  # the quick preset keeps hessgap's defaults
        assert getattr(quick, name) == value
    assert quick.sharpness_solver == "auto" and quick.patience is None


@pytest.mark.parametrize("changes, message", [
    (dict(stop="plateau"), "stop='plateau' needs patience"),
    (dict(stop="forever"), "unknown stop rule 'forever'; choose one of epochs, plateau"),
    (dict(preprocess="whiten"), "unknown preprocess 'whiten'"),
    (dict(init="he"), "unknown init 'he'"),
    (dict(conv_dropout=1), "conv_dropout must be True or False"),
    (dict(sharpness_batchnorm="batch"), "unknown sharpness_batchnorm 'batch'; choose one of eval, train"),
    (dict(max_epochs=0), "max_epochs must be a positive integer"),
    (dict(min_delta=-1.0), "min_delta must be a finite number ≥ 0"),
])
def test_bad_settings_name_themselves(changes, message):
    with pytest.raises(HessgapError, match=message):
        tiny_settings(**changes)


def test_plateau_stopping_trains_the_tables_networks_to_a_plateau_and_the_figures_for_fixed_epochs():
    s = tiny_settings(stop="plateau", patience=3, min_delta=1e-4, max_epochs=40, epochs=7)
    table = networks.train_config(s, 64, 0, epochs=s.epochs_for(64, 1437))
    assert (table.patience, table.min_delta, table.epochs) == (3, 1e-4, 40)
    figure = networks.train_config(s, 64, 0, epochs=7, fixed_epochs=True)
    assert (figure.patience, figure.epochs) == (None, 7)
    plain = tiny_settings(patience=3, epochs=7)  # stop="epochs": patience stops any run, at most its epochs
    assert networks.train_config(plain, 64, 0, fixed_epochs=True).patience == 3
    assert networks.train_config(plain, 64, 0).epochs == 7


def test_runs_keep_their_names_while_the_new_options_keep_their_defaults():
    config = networks.train_config(tiny_settings(), 64, 0)
    before = {k: v for k, v in config.to_dict().items()
              if k not in ("device", "data_root", "keep_checkpoints") and k not in ADDED_DEFAULTS}
    identity = {k: v for k, v in config.to_dict().items() if k not in ("device", "data_root", "keep_checkpoints")
                and not (k in ADDED_DEFAULTS and v == ADDED_DEFAULTS[k])}
    assert identity == before and digest(identity) == digest(before)
    changed = networks.train_config(tiny_settings(init="glorot"), 64, 0).to_dict()
    assert changed["init"] == "glorot"


def test_a_folder_written_before_the_new_settings_resumes(tmp_path):
    settings = tiny_settings().to_dict()
    RunFolder(tmp_path, "reproduce", settings).open().close()
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ADDED_SETTINGS:
        del config["settings"][key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    RunFolder(tmp_path, "reproduce", settings).open(added=ADDED_SETTINGS).close()
    with pytest.raises(HessgapError, match="init: 'pytorch' in the folder, 'glorot' now"):
        RunFolder(tmp_path, "reproduce", tiny_settings(init="glorot").to_dict()).open(added=ADDED_SETTINGS)


def test_the_faithful_variant_reaches_every_run_and_measurement(tmp_path):
    torch.set_num_threads(1)
    s = tiny_settings(model="C2", width=0.05, depth=1.0, epochs=2, stop="plateau", patience=1, min_delta=10.0,
                      max_epochs=4, preprocess="none", init="glorot", conv_dropout=True, sharpness_solver="lbfgsb",
                      sharpness_batchnorm="train", subspace_dim=None, epsilons=(1e-3,), seeds=1,
                      sweep_batches=(64,), warmstart_sb_epochs=2, warmstart_lb_epochs=1,
                      experiments=("gap", "sharpness", "sweep", "warmstart"))
    folder = RunFolder(tmp_path, "reproduce", s.to_dict(), progress=False).open()
    outcome = reproduce(folder, s)
    assert not any("error" in r for r in outcome.values()), outcome
    gap_rows = outcome["gap"]["rows"]
    assert all(r["epochs"] == 2 for r in gap_rows)  # min_delta 10: no epoch after the first improves, patience 1
    trained = load_trained(tmp_path, gap_rows[0]["model"])
    config = trained.config
    assert (config.preprocess, config.init, config.conv_dropout, config.patience) == ("none", "glorot", True, 1)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in trained.model)
    assert float(networks.dataset(s).train.tensors[0].min()) == 0.0  # pixels in [0, 1]
    assert all(r["solver"] == "lbfgsb" and r["train_mode"] for r in outcome["sharpness"]["rows"])
    assert "BatchNorm on the statistics of each batch" in (tmp_path / "report.md").read_text()
    assert "until its training loss had not improved for 1 epochs (at most 4)" in (tmp_path / "report.md").read_text()
    sweep = load_trained(tmp_path, outcome["sweep"]["rows"][0]["model"])
    assert sweep.config.patience is None and len(sweep.history) == 2  # Fig. 4: fixed epochs
    assert [r["warm_epoch"] for r in outcome["warmstart"]["rows"]] == [0, 1, 2]
