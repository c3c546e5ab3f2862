"""HessgapCallback in the real Lightning Trainer on a tiny module: its values in the logged metrics and in a
logger's file, and a run that ends bit-identical to one without it."""

import csv
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from hessgap.integrations.lightning import HessgapCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Classifier(pl.LightningModule):
    def __init__(self, optimizer="sgd"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 3))
        self.optimizer_name = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data(samples=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 10, generator=generator)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def fit(tmp_path, callbacks, optimizer="sgd", steps=20, log_every=5):
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    pl.seed_everything(3, verbose=False)
    module = Classifier(optimizer)
    trainer = pl.Trainer(max_steps=steps, log_every_n_steps=log_every, accelerator="cpu", devices=1,
                         logger=pl.loggers.CSVLogger(str(tmp_path), name="logs"), callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, loader)
    return trainer, module


def tracked():
    x, y = data(samples=128, seed=1)
    return [(x[:64], y[:64]), (x[64:], y[64:])]


def test_values_reach_the_logged_metrics_and_the_logger(tmp_path):
    callback = HessgapCallback(tracked(), every=5, measures=("lambda_max", "critical_sharpness", "eos_ratio"))
    trainer, module = fit(tmp_path, [callback])
    history = callback.tracker.history
    assert [r["step"] for r in history] == [5, 10, 15, 20]
    last = history[-1]
    assert trainer.logged_metrics["hessgap/lambda_max"].item() == pytest.approx(last["lambda_max"], rel=1e-6)
    assert trainer.callback_metrics["hessgap/eos_ratio"].item() == pytest.approx(last["eos_ratio"], rel=1e-6)
    assert last["eos_ratio"] == pytest.approx(last["lambda_max"] * 0.1 / (2 * 1.9), rel=1e-9)  # heavy ball 0.9
    assert all(r["details"]["lambda_max"]["warm"] for r in history[1:])
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("hessgap/lambda_max")]
    assert [float(row["hessgap/lambda_max"]) for row in rows] == pytest.approx([r["lambda_max"] for r in history],
                                                                                rel=1e-6)


def test_a_run_with_the_callback_ends_bit_identical(tmp_path):
    _, plain = fit(tmp_path / "a", [], optimizer="adam")
    callback = HessgapCallback(tracked(), every=4, measures=("lambda_max", "trace", "critical_sharpness"),
                               trace_probes=2)
    trainer, module = fit(tmp_path / "b", [callback], optimizer="adam", log_every=4)
    assert len(callback.tracker.history) == 5
    for (name, a), b in zip(plain.state_dict().items(), module.state_dict().values()):
        assert torch.equal(a, b), name


def test_every_off_the_logging_grid_is_warned_about(tmp_path):
    callback = HessgapCallback(tracked(), every=3)
    with pytest.warns(RuntimeWarning, match="multiple of log_every_n_steps"):
        fit(tmp_path, [callback], steps=6)
    assert [r["step"] for r in callback.tracker.history] == [3, 6]
