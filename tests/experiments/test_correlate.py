"""hessgap correlate on a tiny zoo (seconds): rows, exclusions, τ and granulated τ as the ranking functions
give them, resumption from the measurements saved, the report section and the figure; bad zoo settings."""

import pytest

from hessgap.errors import HessgapError
from hessgap.experiments import correlate
from hessgap.experiments.registry import find
from hessgap.experiments.runs import RunFolder
from hessgap.experiments.zoo import ZooSettings, preset
from hessgap.measures.ranking import kendall_tau, sign_error

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(datasets=("digits",), widths=(0.06,), batch_sizes=(64, 512), lrs=(3e-3,), seeds=(0, 1), depth=0.2,
            epochs=2, lb_epochs=4, min_train_acc=30.0, measure_samples=128, device="cpu",
            measures=("gaussian_adaptive", "fisher_rao", "hessian_trace", "keskar"),
            options={"hessian_trace": {"probes": 4}})


def _run(path, **changes):
    settings = ZooSettings(**{**TINY, **changes})
    with RunFolder(path, "correlate", settings.to_dict(), progress=False).open() as folder:
        return correlate.run(folder, settings), folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("correlate")
    result, _ = _run(path)
    return path, result


def test_tiny_zoo_gives_tau_per_measure(tiny_run):
    path, result = tiny_run
    rows = result["rows"]
    assert len(rows) == 4 and all("excluded" not in r for r in rows)
    per = result["correlations"]["digits"]
    assert set(per) == set(TINY["measures"])
    values = [r["measures"]["values"]["fisher_rao"] for r in rows]
    assert per["fisher_rao"]["tau_acc_gap"] == pytest.approx(kendall_tau(values, [r["acc_gap"] for r in rows]))
    assert per["fisher_rao"]["psi"]["lr"] is None  # one learning rate: no group varies it
    by_hand = [{"batch_size": r["batch_size"], "lr": r["lr"], "width": r["width"], "seed": r["seed"],
                "value": r["measures"]["values"]["fisher_rao"], "gap": r["acc_gap"]} for r in rows]
    signs = sign_error(by_hand, ("batch_size", "lr", "width"), "value", "gap", fixed=("seed",))
    assert per["fisher_rao"]["sign_error"] == signs["value"] and per["fisher_rao"]["robust_sign_error"] == signs["robust"]
    assert per["fisher_rao"]["sign_error_pairs"]["batch_size"] == 2  # two seeds, one pair of batch sizes each
    checked = [r for r in rows if r["measures"]["invariant"]["fisher_rao"] is not None]
    assert len(checked) == 1  # invariance_models = 1
    assert result["invariance"]["digits"]["fisher_rao"]["invariant"] is True
    assert result["invariance"]["digits"]["keskar"]["invariant"] is False
    assert (path / "figures" / "correlate_digits.png").stat().st_size > 10_000
    text = find("correlate").render(result)
    assert "| measure | τ (acc gap)" in text and "fisher_rao" in text and "robust sign-error" in text


def test_an_interrupted_run_resumes_with_its_networks_and_measurements(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(correlate, "correlations", interrupted)
    changes = dict(seeds=(0,), measures=("fisher_rao",))
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, **changes)
    log = (tmp_path / "run.log").read_text()
    assert log.count("measured") == 2 and log.count("training") == 2
    monkeypatch.undo()
    result, _ = _run(tmp_path, **changes)
    log = (tmp_path / "run.log").read_text()
    assert log.count("measured") == 2 and log.count("loading") == 2  # nothing trained or measured again
    again, _ = _run(tmp_path, **changes)
    assert again == result  # a finished run is the stored result


def test_networks_below_the_required_accuracy_are_excluded_with_the_reason(tmp_path):
    result, _ = _run(tmp_path, min_train_acc=100.0, epochs=1, lb_epochs=1, seeds=(0,))
    assert all("train accuracy" in r["excluded"] and "required" in r["excluded"] for r in result["rows"])
    assert all("τ needs at least 3" in e["reason"] for e in result["correlations"]["digits"].values())
    assert "Excluded:" in correlate.render(result) and "n/a" in correlate.render(result)


def test_bad_zoo_settings_are_refused():
    with pytest.raises(HessgapError, match="--data-root"):
        ZooSettings(datasets=("cifar10",))
    with pytest.raises(HessgapError, match="unknown measure"):
        ZooSettings(measures=("sharpest",))
    with pytest.raises(HessgapError, match="percentage"):
        ZooSettings(min_train_acc=120)
    with pytest.raises(HessgapError, match="unknown zoo preset"):
        preset("huge")
    quick = preset("quick")
    assert (quick.epochs_for(32), quick.epochs_for(128), quick.epochs_for(512)) == (50, 77, 120)
    assert len(quick.members()) == 48


def test_cifar_is_read_from_the_users_folder(tmp_path):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (8, 3072)).astype(np.uint8), b"labels": rng.integers(0, 10, 8).tolist()}
        with open(root / name, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
    result, _ = _run(tmp_path / "run", datasets=("cifar10",), data_root=str(tmp_path), batch_sizes=(8, 16),
                     seeds=(0,), min_train_acc=0.0, measures=("fisher_rao",), measure_samples=16)
    assert [r["dataset"] for r in result["rows"]] == ["cifar10", "cifar10"]
    assert all(r["measures"]["values"]["fisher_rao"] > 0 for r in result["rows"])
    assert "τ needs at least 3" in result["correlations"]["cifar10"]["fisher_rao"]["reason"]
