"""The paper's experiments on tiny networks: interpolation math, settings, a full run, resuming, divergence."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import hessgap
from hessgap.errors import HessgapError
from hessgap.experiments import RunFolder, Settings, preset, reproduce
from hessgap.experiments import networks, parametric
from hessgap.experiments.warmstart import warm_epochs
from hessgap.train.checkpoint import load_epoch_state
from hessgap.train.data import load_dataset
from hessgap.train.result import TrainResult
from hessgap.train.models import build_model


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_settings(**changes) -> Settings:
    values = dict(model="F1", dataset="digits", width=0.02, epochs=2, lb_epochs=3, sb_batch=64, lb_batch=512,
                  seeds=2, epsilons=(1e-3, 5e-4), subspace_dim=20, eval_batch=2048, alphas=5, spectrum_k=2,
                  sharpness_every=1, trace_probes=4, sweep_batches=(64, 512), warmstart_sb_epochs=2, warmstart_lb_epochs=1,
                  warmstart_every=1, remedies=("augment", "conservative", "adversarial", "dynamic"), device="cpu")
    values.update(changes)
    return Settings(**values)


def _bn_model(seed: int, width: float = 0.02):
    torch.manual_seed(seed)
    model = build_model("F1", (1, 8, 8), 10, width=width)
    with torch.no_grad():  # non-trivial running statistics, as after training
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return model.eval()


# -- interpolation ---------------------------------------------------------------------------------------

def test_paths_pass_through_both_minimizers():
    a, b = _bn_model(0).state_dict(), _bn_model(1).state_dict()
    for path in ("linear", "curved"):
        at0, _ = parametric.interpolate_state(a, b, *parametric.coefficients(0.0, path))
        at1, _ = parametric.interpolate_state(a, b, *parametric.coefficients(1.0, path))
        for key in a:
            assert torch.equal(at0[key], a[key]), (path, key)
            torch.testing.assert_close(at1[key], b[key], rtol=0, atol=1e-6)
    assert parametric.coefficients(0.5, "curved") == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))
    assert parametric.coefficients(-1.0, "linear") == (2.0, -1.0)
    with pytest.raises(HessgapError, match="linear, curved"):
        parametric.coefficients(0.5, "spline")


def test_extrapolated_batchnorm_variances_are_clamped_and_counted():
    a, b = _bn_model(0).state_dict(), _bn_model(1).state_dict()
    state, clamped = parametric.interpolate_state(a, b, 2.0, -1.0)  # linear path at α = -1
    expected = 0
    for key in a:
        if key.endswith("running_var"):
            raw = 2.0 * a[key] - b[key]
            expected += int((raw < 0).sum())
            assert torch.equal(state[key], raw.clamp_min(0))
        elif key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], a[key])
    assert clamped == expected > 0


def test_interpolating_different_architectures_is_an_error():
    with pytest.raises(HessgapError, match="same model, width and depth"):
        parametric.check_compatible(_bn_model(0, 0.02).state_dict(), _bn_model(1, 0.05).state_dict())


def test_curve_matches_a_hand_built_midpoint():
    settings = tiny_settings()
    sb, lb = _bn_model(0), _bn_model(1)
    curve = parametric.curve(sb, lb, settings, "linear", alphas=[0.0, 0.5], progress=False)
    data = load_dataset("digits")
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    # independent midpoint: average every parameter and buffer through named_parameters / named_buffers
    mid = build_model("F1", (1, 8, 8), 10, width=0.02).eval()
    with torch.no_grad():
        for (name, p), pa, pb in zip(mid.named_parameters(), sb.parameters(), lb.parameters()):
            p.copy_(0.5 * pa + 0.5 * pb)
        for (name, buf), ba, bb in zip(mid.named_buffers(), sb.buffers(), lb.buffers()):
            if buf.is_floating_point():
                buf.copy_(0.5 * ba + 0.5 * bb)
        for model, i in ((sb, 0), (mid, 1)):
            logits = model(x_train.double().float())
            assert curve["train_loss"][i] == pytest.approx(F.cross_entropy(logits, y_train).item(), rel=1e-5)
            assert curve["train_acc"][i] == pytest.approx(100 * (logits.argmax(1) == y_train).double().mean().item())
            assert curve["test_acc"][i] == pytest.approx(100 * (model(x_test).argmax(1) == y_test).double().mean().item())
    assert curve["clamped_variances"] == [0, 0]
    for p, q in zip(sb.parameters(), _bn_model(0).parameters()):  # the models are left untouched
        assert torch.equal(p, q)


# -- settings and folders --------------------------------------------------------------------------------

def test_settings_validation_and_epoch_budget():
    s = tiny_settings(sb_batch=16, lb_batch=1024, epochs=10, lb_epochs=160)
    assert s.epochs_for(16, 1437) == 10 and s.epochs_for(1024, 1437) == 160
    assert s.epochs_for(128, 1437) == 40  # halfway in log batch size: 10 · 16^0.5
    assert s.epochs_for(8, 1437) == 10
    assert tiny_settings(lb_batch=None, lb_fraction=0.1).lb_size(1437) == 144
    assert Settings.from_dict(s.to_dict()) == s
    for bad, match in (({"epochs": 0}, "epochs"), ({"epsilons": (1e-3, -1.0)}, "epsilon"),
                       ({"remedies": ("magic",)}, "augment, conservative"), ({"experiments": ("gap", "x")}, "along_training"),
                       ({"alpha_range": (2.0, -1.0)}, "low < high"), ({"lb_fraction": 1.5}, "lb_fraction")):
        with pytest.raises(HessgapError, match=match):
            tiny_settings(**bad)
    assert preset("quick").dataset == "digits" and preset("paper", model="C1").dataset == "cifar10"
    with pytest.raises(HessgapError, match="quick, paper"):
        preset("fast")


def test_a_folder_refuses_other_settings_but_not_another_device(tmp_path):
    RunFolder(tmp_path, "reproduce", tiny_settings().to_dict()).open()
    RunFolder(tmp_path, "reproduce", tiny_settings(device="cuda", experiments=("gap",)).to_dict()).open()
    with pytest.raises(HessgapError, match="epochs: 2 in the folder, 5 now"):
        RunFolder(tmp_path, "reproduce", tiny_settings(epochs=5).to_dict()).open()
    with pytest.raises(HessgapError, match="'reproduce' run, not 'sweep'"):
        RunFolder(tmp_path, "sweep", tiny_settings().to_dict()).open()


def test_damaged_results_file_names_itself(tmp_path):
    folder = RunFolder(tmp_path, "reproduce", tiny_settings().to_dict()).open()
    folder.results_dir.mkdir()
    (folder.results_dir / "gap.json").write_text('{"experiment": "gap", ')
    with pytest.raises(HessgapError, match="gap.json is not valid JSON"):
        folder.load_result("gap")


# -- a whole run ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("reproduce")
    settings = tiny_settings()
    folder = RunFolder(path, "reproduce", settings.to_dict(), progress=False).open()
    outcome = reproduce(folder, settings)
    return path, settings, outcome


def _load(path, tag):
    checkpoints = sorted((path / "models" / tag / "checkpoints").glob("epoch_*.pt"))
    return TrainResult.load(checkpoints[-1])


def test_every_experiment_finishes_and_reports(full_run):
    path, settings, outcome = full_run
    assert {name: "error" in result for name, result in outcome.items()} == {name: False for name in settings.experiments}
    for name in settings.experiments:
        assert (path / "results" / f"{name}.json").is_file()
    # finished experiments leave no pieces behind; the per-network sharpness cache stays for later commands
    assert [p.name for p in (path / "results").glob("*.parts.json")] == ["measurements.parts.json"]
    report = (path / "report.md").read_text()
    for section in ("## 1. Generalization gap", "## 2. Sharpness", "## 3. Parametric", "## 4. Batch-size sweep",
                    "## 5. Warm-started", "## 6. Sharpness along training", "## 7. Remedies", "## 8. Top Hessian"):
        assert section in report
    assert "Not finished yet" not in report
    for figure in ("gap", "sharpness", "parametric", "spectrum", "along_training", "sweep", "warmstart", "remedies"):
        assert (path / "figures" / f"{figure}.png").stat().st_size > 1000


def test_gap_numbers_match_an_independent_evaluation(full_run):
    path, settings, outcome = full_run
    data = load_dataset("digits")
    x, y = data.test.tensors
    for row in outcome["gap"]["rows"]:
        model = _load(path, row["model"]).model.eval()
        with torch.no_grad():
            accuracy = 100 * (model(x).argmax(1) == y).double().mean().item()
        assert row["test_acc"] == pytest.approx(accuracy)
        assert row["batch_size"] == (64 if row["regime"] == "sb" else 512)
        assert row["epochs"] == (2 if row["regime"] == "sb" else 3)
    summary = outcome["gap"]["summary"]
    sb = [r["test_acc"] for r in outcome["gap"]["rows"] if r["regime"] == "sb"]
    assert summary["sb"]["test_acc"][0] == pytest.approx(sum(sb) / 2)
    assert summary["sb"]["test_acc"][1] == pytest.approx(abs(sb[0] - sb[1]) / math.sqrt(2))


def test_sharpness_table_matches_direct_calls(full_run):
    path, settings, outcome = full_run
    rows = outcome["sharpness"]["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # seeds × regimes × spaces × epsilons
    row = next(r for r in rows if r["regime"] == "lb" and r["space"] == "subspace" and r["epsilon"] == 1e-3 and r["seed"] == 1)
    model = _load(path, row["model"]).model
    loader = networks.analysis_loader(settings)
    direct = hessgap.sharpness(model, loader, epsilon=1e-3, subspace_dim=20, seed=1)
    assert row["value"] == pytest.approx(direct.value, rel=1e-6)
    table = outcome["sharpness"]["tables"]["full"]["sb"]["0.001"]
    values = [r["value"] for r in rows if r["regime"] == "sb" and r["space"] == "full" and r["epsilon"] == 1e-3]
    assert table[0] == pytest.approx(sum(values) / 2)


def test_warm_starts_begin_at_the_sb_iterates(full_run):
    path, settings, outcome = full_run
    result = outcome["warmstart"]
    assert [r["warm_epoch"] for r in result["rows"]] == warm_epochs(settings) == [0, 1, 2]
    sb_dir = path / "models" / result["sb_model"]
    for row in result["rows"][1:]:
        start = load_epoch_state(path / "models" / row["model"], 0)
        iterate = load_epoch_state(sb_dir, row["warm_epoch"])
        for key in iterate:
            assert torch.equal(start[key], iterate[key]), key


def test_along_training_and_distance_ratio(full_run):
    path, settings, outcome = full_run
    result = outcome["along_training"]
    assert [p["epoch"] for p in result["curves"]["sb"]] == [1, 2]
    assert [p["epoch"] for p in result["curves"]["lb"]] == [1, 2, 3]
    sb = _load(path, result["models"]["sb"])
    lb = _load(path, result["models"]["lb"])
    torch.testing.assert_close(sb.x0, lb.x0)  # one seed, one start
    d_sb = (torch.nn.utils.parameters_to_vector(sb.model.parameters()) - sb.x0).norm()
    d_lb = (torch.nn.utils.parameters_to_vector(lb.model.parameters()) - lb.x0).norm()
    assert result["distance_ratio"] == pytest.approx((d_sb / d_lb).item(), rel=1e-5)


def _reference_top_eigenvalues(model, data, k: int = 2) -> list[float]:
    """Top-k eigenvalues of the training-loss Hessian (eval mode, whole training set, float64) by scipy's
    ARPACK on plain double-backward Hessian-vector products: independent of hessgap's HVP engine."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    model = model.double().eval()
    params = list(model.parameters())
    x, y = data.train.tensors
    loss = F.cross_entropy(model(x.double()), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])

    def matvec(v):
        hv = torch.autograd.grad(grad @ torch.as_tensor(v, dtype=torch.float64).reshape(-1), params, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    n = grad.numel()
    values = eigsh(LinearOperator((n, n), matvec=matvec, dtype="float64"), k=k, which="LA", tol=1e-10,
                   return_eigenvectors=False)
    return sorted(values.tolist(), reverse=True)


def test_spectrum_matches_a_reference_eigensolver(full_run):
    path, settings, outcome = full_run
    spectrum = outcome["spectrum"]
    data = load_dataset("digits")
    for regime in ("sb", "lb"):
        entry = spectrum["models"][regime]
        reference = _reference_top_eigenvalues(_load(path, entry["model"]).model, data)
        assert entry["eigenvalues"] == pytest.approx(reference, rel=1e-3)
        assert entry["trace"] is not None and entry["trace_ci"] is not None
        same = next(r for r in outcome["sharpness"]["rows"]
                    if r["model"] == entry["model"] and r["space"] == "full" and r["epsilon"] == 1e-3)
        assert entry["sharpness"] == same["value"]  # one measurement per network, shared by the experiments


def test_remedies_rows(full_run):
    path, settings, outcome = full_run
    names = [r["name"] for r in outcome["remedies"]["rows"]]
    assert names == ["SB", "LB", "LB + augment", "LB + conservative", "LB + adversarial", "LB + dynamic"]
    start, final, growth = outcome["remedies"]["dynamic_schedule"]
    assert (start, final) == (64, 512) and growth == pytest.approx(8 ** (1 / 1))


def test_rerun_on_a_finished_folder_trains_nothing(full_run, monkeypatch):
    path, settings, first = full_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished folder must not train again")

    monkeypatch.setattr("hessgap.train.loop.train", no_training)
    folder = RunFolder(path, "reproduce", settings.to_dict(), progress=False).open()
    assert reproduce(folder, settings) == json.loads(json.dumps(first))


def test_rerun_after_losing_a_result_reuses_the_trained_networks(full_run):
    path, settings, first = full_run
    checkpoints = {p: p.stat().st_mtime_ns for p in (path / "models").rglob("*.pt")}
    (path / "results" / "sweep.json").unlink()
    folder = RunFolder(path, "reproduce", settings.replace(experiments=("sweep",)).to_dict(), progress=False).open()
    again = reproduce(folder, settings.replace(experiments=("sweep",)))
    assert again["sweep"]["rows"] == first["sweep"]["rows"]
    assert {p: p.stat().st_mtime_ns for p in (path / "models").rglob("*.pt")} == checkpoints


def test_diverging_runs_are_reported_not_averaged(tmp_path):
    settings = tiny_settings(optimizer="sgd", lr=1e30, seeds=1, experiments=("gap", "parametric"))
    folder = RunFolder(tmp_path, "reproduce", settings.to_dict(), progress=False).open()
    outcome = reproduce(folder, settings)
    rows = outcome["gap"]["rows"]
    assert [r["diverged"] for r in rows] == [1, 1]
    assert outcome["gap"]["summary"]["sb"]["test_acc"] is None
    assert "diverged at epoch 1" in outcome["parametric"]["error"]
    report = (tmp_path / "report.md").read_text()
    assert "diverged at epoch 1" in report and "**parametric failed**: the SB network diverged at epoch 1" in report
    assert list((tmp_path / "models").glob("sb-seed0-*/checkpoints/epoch_0000.pt"))  # checkpoints are kept


def test_batch_larger_than_the_data_is_refused(tmp_path):
    settings = tiny_settings(lb_batch=5000, experiments=("gap",))
    folder = RunFolder(tmp_path, "reproduce", settings.to_dict(), progress=False).open()
    assert "LB batch size 5000 is larger than the training set (1437 samples)" in reproduce(folder, settings)["gap"]["error"]
