"""HessgapCallback in the real Hugging Face Trainer (transformers + accelerate) on a tiny GPT-2: its values in
``trainer.state.log_history`` and in what every reporting callback receives, and a run that ends bit-identical
to one without it."""

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from hessgap.integrations.transformers import HessgapCallback  # noqa: E402

from oracles import tiny_hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Tokens(torch.utils.data.Dataset):
    """Synthetic sequences with a pattern to learn (each token the previous plus one, modulo the vocabulary)."""

    def __init__(self, rows=64, length=12, vocab=23, seed=0):
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(1, vocab, (rows, 1), generator=generator)
        self.ids = (start + torch.arange(length)) % (vocab - 1) + 1

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Recorder(transformers.TrainerCallback):
    """A stand-in for a reporter (TensorBoard, W&B): keeps every log dict it receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def tracked_batches():
    data = Tokens(rows=16, seed=1)
    return [{"input_ids": data.ids[i : i + 8], "labels": data.ids[i : i + 8]} for i in (0, 8)]


def train(tmp_path, callbacks, seed=0, steps=12, logging_steps=100):
    transformers.logging.set_verbosity_error()
    model = tiny_hf("gpt2", dtype=torch.float32, seed=seed).train()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=logging_steps, report_to=[], save_strategy="no", use_cpu=True, seed=seed, data_seed=seed,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train()
    return trainer


def test_values_reach_the_log_history_and_every_reporter(tmp_path):
    recorder = Recorder()
    callback = HessgapCallback(tracked_batches(), every=4, measures=("lambda_max", "critical_sharpness"),
                               out=tmp_path / "tracking")
    trainer = train(tmp_path, [recorder, callback])  # the reporter first, as report_to registers them
    logged = [entry for entry in trainer.state.log_history if "hessgap/lambda_max" in entry]
    assert [entry["step"] for entry in logged] == [4, 8, 12]
    history = callback.tracker.history
    for entry, record in zip(logged, history):
        assert entry["hessgap/lambda_max"] == record["lambda_max"] > 0
        assert entry["hessgap/critical_sharpness"] == record["critical_sharpness"]
        assert entry["hessgap/hvps"] == record["hvps"]
        assert "loss" in entry  # the Trainer's own log of that step, filled in
    seen = [log for log in recorder.logs if "hessgap/lambda_max" in log]
    assert [log["hessgap/lambda_max"] for log in seen] == [r["lambda_max"] for r in history]
    assert trainer.callback_handler.callbacks[0] is callback
    assert history[1]["details"]["lambda_max"]["warm"]
    assert (tmp_path / "tracking" / "history.jsonl").read_text().count("\n") == 3
    # the learning rate of the next step, read through accelerate's optimizer wrapper: the linear decay ends at
    # 0, where the step vanishes but its direction still has a critical learning rate
    assert [record["lr"] for record in history] == sorted((record["lr"] for record in history), reverse=True)
    assert history[-1]["lr"] == trainer.optimizer.param_groups[0]["lr"] == 0.0
    assert history[-1]["critical_sharpness"] > 0


def test_a_run_with_the_callback_ends_bit_identical(tmp_path):
    plain = train(tmp_path / "a", [])
    callback = HessgapCallback(tracked_batches(), every=3, measures=("lambda_max", "trace", "critical_sharpness"),
                               trace_probes=2)
    tracked = train(tmp_path / "b", [callback])
    assert len(callback.tracker.history) == 4
    for (name, a), b in zip(plain.model.state_dict().items(), tracked.model.state_dict().values()):
        assert torch.equal(a, b), name
    state_a, state_b = plain.optimizer.state_dict(), tracked.optimizer.state_dict()
    for key, entry in state_a["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b["state"][key][name])), name
    losses = lambda trainer: [e["train_loss"] for e in trainer.state.log_history if "train_loss" in e]  # noqa: E731
    # the same losses, summed by the Trainer in float32 over other intervals (it logs at the tracked steps too)
    assert losses(plain) == pytest.approx(losses(tracked), rel=1e-6)
