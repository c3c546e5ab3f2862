"""The training loop: metrics, exact resume, callbacks, divergence, patience, warm starts, random state."""

import dataclasses
import json
import math

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from hessgap.errors import HessgapError
from hessgap.train import (
    TrainResult,
    build_model,
    evaluate,
    list_checkpoints,
    load_dataset,
    load_epoch_state,
    make_loader,
    train,
)

from tiny_runs import same_weights, tiny, weights, without_time

pytestmark = pytest.mark.usefixtures("one_thread")


def test_history_records_the_papers_quantities(digits):
    result = train(tiny(epochs=3), dataset=digits, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    keys = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "distance_from_start", "sharpness",
            "batch_size", "lr", "seconds"}
    assert keys <= set(result.final) and result.final == result.history[-1]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.final["train_acc"] > 0.5 and result.final["sharpness"] is None
    assert all(h["batch_size"] == 128 and h["lr"] == 1e-3 for h in result.history)
    assert result.diverged is None and not result.model.training
    # x0 is the seeded initialisation, and the distance is ‖x − x0‖
    torch.manual_seed(0)
    init = build_model("F1", (1, 8, 8), 10, width=0.05, depth=0.4)
    torch.testing.assert_close(result.x0, parameters_to_vector(init.parameters()), rtol=0, atol=0)
    distance = float((parameters_to_vector(result.model.parameters()).detach() - result.x0).norm())
    assert result.final["distance_from_start"] == pytest.approx(distance, rel=1e-6)
    # the metrics are the model's, in eval mode, over the whole splits
    train_loss, train_acc = evaluate(result.model, make_loader(digits.train, 500, shuffle=False))
    assert train_loss == pytest.approx(result.final["train_loss"], rel=1e-5)
    assert train_acc == pytest.approx(result.final["train_acc"])
    json.dumps(result.to_dict(), allow_nan=False)


def test_resume_is_bit_exact(digits, tmp_path):
    # C1 has dropout (global RNG) and augmentation draws from its own generator: both must resume exactly
    config = tiny(model="C1", width=0.1, depth=0.5, batch_size=200, epochs=4, remedy="augment")
    whole = train(config, out_dir=tmp_path / "whole", dataset=digits, progress=False)
    first = train(tiny(**{**config.to_dict(), "epochs": 2}), out_dir=tmp_path / "split", dataset=digits, progress=False)
    assert len(first.history) == 2
    resumed = train(config, out_dir=tmp_path / "split", dataset=digits, progress=False)
    assert resumed.resumed_from == 2
    assert same_weights(weights(whole.model), weights(resumed.model))
    assert without_time(whole.history) == without_time(resumed.history)
    assert torch.equal(whole.x0, resumed.x0)
    assert sorted(list_checkpoints(tmp_path / "split")) == [0, 1, 2, 3, 4]
    saved = json.loads((tmp_path / "split" / "history.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3, 4]


def test_interrupted_run_resumes_and_finished_run_returns_at_once(digits, tmp_path):
    config = tiny(epochs=3)
    reference = train(config, dataset=digits, progress=False)

    def interrupt(record, model):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, out_dir=tmp_path, dataset=digits, progress=False, epoch_callback=interrupt)
    assert sorted(list_checkpoints(tmp_path)) == [0, 1, 2]
    assert not json.loads((tmp_path / "history.json").read_text())["finished"]
    calls = []
    resumed = train(config, out_dir=tmp_path, dataset=digits, progress=False,
                    epoch_callback=lambda record, model: calls.append(record["epoch"]))
    assert calls == [3] and same_weights(weights(reference.model), weights(resumed.model))
    again = train(config, out_dir=tmp_path, dataset=digits, progress=False,
                  epoch_callback=lambda record, model: calls.append(record["epoch"]))
    assert calls == [3] and again.resumed_from == 3 and len(again.history) == 3 and again.finished
    assert json.loads((tmp_path / "history.json").read_text())["finished"]
    assert same_weights(weights(TrainResult.load(tmp_path).model), weights(again.model))
    assert same_weights(weights(resumed.model), weights(again.model))


def test_callback_returning_true_stops_without_finishing(digits, tmp_path):
    stopped = train(tiny(epochs=3), out_dir=tmp_path, dataset=digits, progress=False,
                    epoch_callback=lambda record, model: True)
    assert len(stopped.history) == 1
    assert len(train(tiny(epochs=3), out_dir=tmp_path, dataset=digits, progress=False).history) == 3


def test_resuming_with_another_configuration_is_refused(digits, tmp_path):
    train(tiny(epochs=1), out_dir=tmp_path, dataset=digits, progress=False)
    with pytest.raises(HessgapError, match="batch_size=128.*batch_size=64"):
        train(tiny(epochs=2, batch_size=64), out_dir=tmp_path, dataset=digits, progress=False)


def test_diverging_run_stops_and_keeps_the_checkpoints(digits, tmp_path):
    config = tiny(optimizer="sgd", lr=1e6, momentum=0.9, epochs=5)
    result = train(config, out_dir=tmp_path, dataset=digits, progress=False)
    assert result.diverged is not None and len(result.history) == result.diverged < 5
    assert not math.isfinite(result.final["train_loss"])
    assert all(torch.isfinite(p).all() for p in result.model.parameters())  # the last finite weights
    last_good = load_epoch_state(tmp_path, result.diverged - 1)
    assert same_weights(weights(result.model), last_good)
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["diverged"] == result.diverged and saved["history"][-1]["train_loss"] is None
    assert saved["finished"] and result.finished
    again = train(config, out_dir=tmp_path, dataset=digits, progress=False)
    assert again.diverged == result.diverged and len(again.history) == len(result.history)
    loaded = TrainResult.load(tmp_path)  # a run folder: its latest checkpoint and its recorded divergence
    assert loaded.diverged == result.diverged and same_weights(weights(loaded.model), last_good)
    in_memory = train(config, dataset=digits, progress=False)
    assert in_memory.diverged == result.diverged
    assert same_weights(weights(in_memory.model), last_good)


def test_patience_stops_when_the_training_loss_stops_improving(digits, tmp_path):
    config = tiny(lr=1e-9, patience=2, min_delta=1e-3, epochs=10, sharpness_every=5, sharpness_batches=1)
    result = train(config, out_dir=tmp_path, dataset=digits, progress=False)
    assert result.stopped_early == 3 and len(result.history) == 3  # epoch 1 sets the best, 2 and 3 fail
    assert [h["sharpness"] is not None for h in result.history] == [False, False, True]  # the last epoch's
    assert len(train(config, out_dir=tmp_path, dataset=digits, progress=False).history) == 3


def test_warm_start_from_given_weights(digits, tmp_path):
    sb = train(tiny(batch_size=32, epochs=1), out_dir=tmp_path / "sb", dataset=digits, progress=False)
    start = load_epoch_state(tmp_path / "sb", 1)
    lb = train(tiny(batch_size=500, epochs=1, seed=3), dataset=digits, init_state=start, progress=False)
    assert torch.equal(lb.x0, parameters_to_vector(sb.model.parameters()))
    train(tiny(batch_size=500, epochs=1, seed=3), out_dir=tmp_path / "lb", dataset=digits, init_state=start,
          progress=False)
    with pytest.raises(HessgapError, match="warm-started from other weights"):
        train(tiny(batch_size=500, epochs=2, seed=3), out_dir=tmp_path / "lb", dataset=digits,
              init_state=load_epoch_state(tmp_path / "sb", 0), progress=False)
    with pytest.raises(HessgapError, match="init_state does not fit"):
        train(tiny(width=0.1), dataset=digits, init_state=start, progress=False)


def test_train_leaves_the_callers_random_state_alone(digits):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train(tiny(epochs=1), dataset=digits, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_c_nets_train_on_flat_signals():
    data = load_dataset("mnist1d")
    result = train(tiny(model="C1", dataset="mnist1d", width=0.1, epochs=1, batch_size=256), dataset=data, progress=False)
    assert result.input_shape == (40,) and math.isfinite(result.final["test_loss"])


@pytest.mark.cuda
def test_training_on_cuda_resumes_and_matches_the_cpu_run_closely(digits, tmp_path):
    config = tiny(model="C1", width=0.1, depth=0.5, epochs=3, remedy="augment", device="cuda")
    cpu = train(tiny(**{**config.to_dict(), "device": "cpu"}), dataset=digits, progress=False)
    train(tiny(**{**config.to_dict(), "epochs": 1}), out_dir=tmp_path, dataset=digits, progress=False)
    gpu = train(config, out_dir=tmp_path, dataset=digits, progress=False)
    assert gpu.resumed_from == 1 and next(gpu.model.parameters()).is_cuda and gpu.x0.is_cuda
    assert gpu.final["train_acc"] == pytest.approx(cpu.final["train_acc"], abs=0.05)
    loaded = TrainResult.load(tmp_path, map_location="cuda")
    assert next(loaded.model.parameters()).is_cuda


def test_two_trainings_never_share_a_folder(digits, tmp_path):
    from lock_holder import other_process_holding

    with other_process_holding(tmp_path) as holder:
        with pytest.raises(HessgapError, match=rf"in use by another hessgap process \(pid {holder.pid}\)"):
            train(tiny(epochs=1), out_dir=tmp_path, dataset=digits, progress=False)
        assert not (tmp_path / "checkpoints").exists()
    assert len(train(tiny(epochs=1), out_dir=tmp_path, dataset=digits, progress=False).history) == 1


def _with_labels(dataset, dtype, name="mine"):
    """``dataset`` under another name with a copy of its labels in ``dtype`` (the session's digits stay as they are)."""

    def relabel(split):
        inputs, labels = split.tensors
        return torch.utils.data.TensorDataset(inputs, labels.to(dtype, copy=True))

    return dataclasses.replace(dataset, name=name, train=relabel(dataset.train), test=relabel(dataset.test))


@pytest.mark.parametrize("remedy", [None, "adversarial", "conservative"])
def test_a_callers_int32_labels_train_exactly_as_int64(digits, remedy):
    """Was: RuntimeError 'expected target dtype to be Long or Byte, but got Int' from the first training step."""
    config = tiny(dataset="mine", remedy=remedy, sharpness_every=1)
    wide = train(config, dataset=_with_labels(digits, torch.int64), progress=False)
    narrow = train(config, dataset=_with_labels(digits, torch.int32), progress=False)
    untimed = [[{k: v for k, v in h.items() if not k.endswith("seconds")} for h in r.history] for r in (narrow, wide)]
    assert untimed[0] == untimed[1]
    assert same_weights(weights(narrow.model), weights(wide.model))


def test_a_callers_labels_that_are_not_class_indices_are_refused(digits):
    with pytest.raises(HessgapError, match="the train split's labels are torch.float32; .* use integer labels"):
        train(tiny(dataset="mine"), dataset=_with_labels(digits, torch.float32), progress=False)
    wrong = _with_labels(digits, torch.int64)
    wrong.test.tensors[1][0] = 10
    with pytest.raises(HessgapError, match="the test split's labels run from 0 to 10, outside 0..9"):
        train(tiny(dataset="mine"), dataset=wrong, progress=False)


def test_a_network_too_large_to_train_is_refused_before_the_folder_is_made(digits, tmp_path):
    """Was: a RuntimeError from torch's allocator, after the run folder and its lock were made."""
    with pytest.raises(HessgapError, match=r"F1 \(width 1e\+09, depth 0.4\) on digits has .* parameters, .* training "
                                           r"with adam \(the weights, their gradients and ADAM's two moments\) holds "
                                           r"4 copies of them"):
        train(tiny(width=1e9), out_dir=tmp_path / "run", dataset=digits, progress=False)
    assert not (tmp_path / "run").exists()
