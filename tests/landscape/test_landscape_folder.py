"""Run folders: rows saved as they finish and skipped on a rerun, a folder of other settings refused, and the
files (JSON, npz, VTK, PNG) a landscape writes."""

import json

import numpy as np
import pytest
import torch

from hessgap.errors import HessgapError
from hessgap.landscape import landscape, run_landscape

pytestmark = pytest.mark.usefixtures("one_thread")
PNG = b"\x89PNG\r\n\x1a\n"


class Interrupted(Exception):
    pass


def _stored_rows(folder) -> dict:
    """The rows file of a run folder: one JSON line a finished row."""
    lines = (folder / "results" / "landscape.rows.jsonl").read_text().splitlines()
    return {record["row"]: record["values"] for record in map(json.loads, lines)}


@pytest.mark.parametrize("directions", ["random", "hessian"])
def test_an_interrupted_run_resumes_with_its_finished_rows(tmp_path, ref, directions):
    model, data = ref.mlp(), ref.batches((3, 4))
    uninterrupted = landscape(model, data, directions=directions, steps=(3, 5))
    seen = []

    def stop_after_two(row, values):
        seen.append(row)
        if len(seen) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_landscape(tmp_path / "run", model, data, directions=directions, steps=(3, 5), progress=False,
                      on_row=stop_after_two)
    rows = _stored_rows(tmp_path / "run")
    assert sorted(rows) == [0, 1]  # the row whose callback raised was saved before
    assert not (tmp_path / "run" / "results" / "landscape.json").exists()

    seen.clear()
    resumed = run_landscape(tmp_path / "run", model, data, directions=directions, steps=(3, 5), progress=False,
                            on_row=lambda row, values: seen.append(row))
    assert seen == [2, 3, 4] and resumed.rows_resumed == 2 and resumed.passes == 3
    assert torch.equal(resumed.directions, uninterrupted.directions)
    np.testing.assert_array_equal(resumed.loss, uninterrupted.loss)  # bit for bit
    np.testing.assert_array_equal(resumed.accuracy, uninterrupted.accuracy)
    assert resumed.eigenvalues == uninterrupted.eigenvalues

    seen.clear()
    again = run_landscape(tmp_path / "run", model, data, directions=directions, steps=(3, 5), progress=False,
                          on_row=lambda row, values: seen.append(row))
    assert seen == [] and again.rows_resumed == 5 and again.engine == resumed.engine
    np.testing.assert_array_equal(again.loss, resumed.loss)


def test_a_folder_of_other_settings_or_models_is_refused(tmp_path, ref):
    model, data = ref.mlp(), ref.batches((3, 4))
    landscape(model, data, steps=3, out=tmp_path)
    with pytest.raises(HessgapError, match=r"other inputs; changed: steps \(3 in the folder, 4 now\)\. It resumes "
                                           "only with the very same ones: use a new output folder"):
        landscape(model, data, steps=4, out=tmp_path)
    with pytest.raises(HessgapError, match="changed: the model's parameters and the model's buffers"):
        landscape(ref.mlp(seed=5), data, steps=3, out=tmp_path)
    n = sum(p.numel() for p in model.parameters())
    landscape(model, data, directions=torch.ones(2, n, dtype=torch.float64), steps=3, out=tmp_path / "given")
    with pytest.raises(HessgapError, match="changed: the given direction tensors"):
        landscape(model, data, directions=2 * torch.ones(2, n, dtype=torch.float64), steps=3, out=tmp_path / "given")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"command": "train", "settings": {}}')
    with pytest.raises(HessgapError, match="holds a 'train' run, not a landscape"):
        landscape(model, data, steps=3, out=tmp_path / "other")


def test_a_crafted_directions_file_is_refused_without_running_its_code(tmp_path, ref):
    from crafted import RunsCode

    model, data = ref.mlp(), ref.batches((3, 4))
    landscape(model, data, steps=3, out=tmp_path)
    marker, stored = tmp_path / "code-ran", tmp_path / "results" / "directions.pt"
    payload = torch.load(stored, weights_only=True)
    torch.save({**payload, "eigenvalues": RunsCode(marker)}, stored)
    (tmp_path / "results" / "landscape.json").unlink()  # unfinished: a rerun reads the directions back
    with pytest.raises(HessgapError, match=r"directions\.pt holds objects other than tensors.*delete it to draw the "
                                           "directions again"):
        landscape(model, data, steps=3, out=tmp_path)
    assert not marker.exists()


def _swap_rows(model):
    """The first layer's first two rows of weights swapped: the parameters' count, sum and norm stay the same."""
    with torch.no_grad():
        model[1].weight[[0, 1]] = model[1].weight[[1, 0]].clone()
    return model


def _shift_running_mean(model):
    with torch.no_grad():
        model[2].running_mean.add_(0.5)
    return model


def _rebatched(data):
    """The same samples in other batches (another batch size)."""
    inputs, labels = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    return [(inputs[:20], labels[:20]), (inputs[20:], labels[20:])]


def _one_value_changed(data):
    changed = [(x.clone(), y.clone()) for x, y in data]
    changed[2][0][0, 0, 0] += 1e-3
    return changed


def _smoothed(options):
    return options | {"loss_fn": torch.nn.CrossEntropyLoss(label_smoothing=0.1)}


def _shifted_test_data(options):
    return options | {"test_data": [(x + 1e-3, y) for x, y in options["test_data"]]}


# (what changes in the model, in the data, in the options; the error's words): each change makes other numbers,
# and none changes the parameters' count, sum and norm or the loss function's type
CHANGES = {
    "swapped weights": (_swap_rows, None, None, r"changed: the model's parameters\. It resumes"),
    "BatchNorm buffers": (_shift_running_mean, None, None, r"changed: the model's buffers \(BatchNorm running"),
    "data": (None, _one_value_changed, None, r"changed: the data \(the batches' contents, shapes or number"),
    "batch size": (None, _rebatched, None, r"changed: the data \(the batches' contents, shapes or number"),
    "max_batches": (None, None, lambda options: options | {"max_batches": 2},
                    r"changed: max_batches \(None in the folder, 2 now\); the data"),
    "loss_fn": (None, None, _smoothed, r"changed: the loss function \(torch.nn.modules.loss.CrossEntropyLoss\(\{"
                                      r".*'label_smoothing': 0.0.*\) in the folder, .*'label_smoothing': 0.1"),
    "test data": (None, None, _shifted_test_data, r"changed: the test data\."),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_input_is_named_instead_of_resumed(tmp_path, ref, change):
    change_model, change_data, change_options, message = CHANGES[change]
    model, data = ref.mlp(), ref.batches((3, 4))
    options = {"test_data": ref.batches((3, 4), samples=12, sizes=(12,), seed=4), "steps": 3, "out": tmp_path,
               "loss_fn": torch.nn.CrossEntropyLoss()}
    landscape(model, data, **options)
    model = change_model(model) if change_model else model
    data = change_data(data) if change_data else data
    options = change_options(options) if change_options else options
    with pytest.raises(HessgapError, match=message):
        landscape(model, data, **options)


def test_a_genuine_rerun_resumes_bit_for_bit_with_equal_copies_of_its_inputs(tmp_path, ref):
    """Fresh but equal model, data and loss function objects (as after a restart) resume every row."""
    loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    first = landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 4), loss_fn=loss, out=tmp_path)
    again = landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 4), loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                      out=tmp_path)
    assert again.rows_resumed == 4 and again.passes == 0
    np.testing.assert_array_equal(again.loss, first.loss)


def test_a_folder_of_an_earlier_version_is_refused(tmp_path, ref):
    """Earlier folders fingerprinted a model by its parameters' count, sum and norm only."""
    (tmp_path / "config.json").write_text(json.dumps({
        "command": "landscape", "settings": {"directions": "random", "dims": 2, "steps": 3},
        "models": {"model": {"parameters": 203, "sum": 1.5, "norm": 4.0}, "others": []}, "hessgap": "0.4.0"}))
    with pytest.raises(HessgapError, match=r"written by an earlier version of hessgap \(0.4.0\).* cannot be "
                                           "verified; use a new output folder"):
        landscape(ref.mlp(), ref.batches((3, 4)), steps=3, out=tmp_path)


def test_a_closure_hessgap_cannot_fingerprint_runs_but_does_not_resume(tmp_path, ref):
    import random

    model, data = ref.mlp(), ref.batches((3, 4))
    generator = random.Random(0)  # state hessgap cannot read: a rerun's closure may compute something else

    def loss(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets) * (1 + 0 * generator.random())

    landscape(model, data, steps=3, loss_fn=loss, out=tmp_path)
    with pytest.raises(HessgapError, match="cannot be resumed: its loss function is unverifiable: .*loss closes "
                                           "over Random"):
        landscape(model, data, steps=3, loss_fn=loss, out=tmp_path)


def test_directions_of_another_folder_are_refused(tmp_path, ref):
    model, data = ref.mlp(), ref.batches((3, 4))
    landscape(model, data, steps=3, seed=1, out=tmp_path / "a")
    landscape(model, data, steps=3, seed=2, out=tmp_path / "b")
    (tmp_path / "b" / "results" / "directions.pt").replace(tmp_path / "a" / "results" / "directions.pt")
    (tmp_path / "a" / "results" / "landscape.rows.jsonl").unlink()
    with pytest.raises(HessgapError, match="directions.pt was not computed for this folder's settings and inputs"):
        landscape(model, data, steps=3, seed=1, out=tmp_path / "a")


def test_a_folder_in_use_by_another_process_is_refused(tmp_path, ref):
    from lock_holder import other_process_holding

    with other_process_holding(tmp_path) as holder:
        with pytest.raises(HessgapError, match=f"in use by another hessgap process \\(pid {holder.pid}\\)"):
            landscape(ref.mlp(), ref.batches((3, 4)), steps=3, out=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".hessgap.lock"]  # nothing written
    landscape(ref.mlp(), ref.batches((3, 4)), steps=3, out=tmp_path)  # free again


_KILLED_RUN = """
import sys, time, torch
sys.path.insert(0, sys.argv[2])
from conftest import make_mlp, batches
from hessgap.landscape import landscape
torch.set_num_threads(1)

def after_row(row, values):
    if row == 1:
        print("two rows saved", flush=True)
        time.sleep(600)  # killed here

landscape(make_mlp(), batches((3, 4)), steps=(3, 5), out=sys.argv[1], on_row=after_row)
"""


def test_a_killed_run_resumes_bit_for_bit(tmp_path, ref):
    """SIGKILL after two rows: the folder's lock dies with the process, and the rerun computes only the rest."""
    import os
    import subprocess
    import sys

    uninterrupted = landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 5), out=tmp_path / "straight")
    process = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tmp_path / "run"), os.path.dirname(__file__)],
                               stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert process.stdout.readline().strip() == "two rows saved"
    finally:
        process.kill()
        process.wait(timeout=60)
    resumed = landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 5), out=tmp_path / "run")
    assert resumed.rows_resumed == 2 and resumed.passes == 3
    np.testing.assert_array_equal(resumed.loss, uninterrupted.loss)
    np.testing.assert_array_equal(resumed.accuracy, uninterrupted.accuracy)


def test_files_of_a_plane(tmp_path, ref):
    model, data = ref.cnn(), ref.batches((2, 8, 8))
    test = ref.batches((2, 8, 8), samples=10, sizes=(10,), seed=4)
    result = landscape(model, data, test_data=test, steps=(4, 3), out=tmp_path)
    results, figures = tmp_path / "results", tmp_path / "figures"
    assert json.loads((tmp_path / "config.json").read_text())["command"] == "landscape"

    stored = json.loads((results / "landscape.json").read_text())
    assert stored["kind"] == "random" and "directions" not in stored
    np.testing.assert_allclose(stored["loss"], result.loss, rtol=1e-15)
    assert stored["files"]["npz"] == str(results / "landscape.npz")

    with np.load(results / "landscape.npz") as arrays:
        assert set(arrays.files) == {"x", "y", "directions", "train_loss", "train_accuracy", "test_loss",
                                     "test_accuracy", "settings"}
        np.testing.assert_array_equal(arrays["train_loss"], result.loss)
        np.testing.assert_array_equal(arrays["y"], result.y)
        np.testing.assert_array_equal(arrays["directions"], result.directions.numpy())
        assert json.loads(str(arrays["settings"]))["steps"] == [4, 3]

    vtp = (results / "landscape.vtp").read_text()
    assert vtp.startswith('<?xml version="1.0"?>\n<VTKFile type="PolyData" version="1.0"')
    assert 'NumberOfPoints="12"' in vtp and 'NumberOfPolys="6"' in vtp
    for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert f'Name="{name}"' in vtp
    assert vtp.rstrip().endswith("</VTKFile>")

    for surface in ("train_loss", "test_loss"):
        for style in ("contour", "filled", "surface"):
            path = figures / f"{surface}_{style}.png"
            assert path.read_bytes()[:8] == PNG and result.files[f"{surface}_{style}"] == str(path)
    assert not list(tmp_path.rglob("*.tmp"))  # every write went through a rename

    later = landscape(model, data, test_data=test, steps=(4, 3)).save(tmp_path / "saved")  # no run folder
    assert {key for key in later if key != "json"} == {key for key in result.files if key != "json"}
    assert (tmp_path / "saved" / "figures" / "train_loss_surface.png").read_bytes()[:8] == PNG


def test_files_of_a_line_between_models_with_a_diverging_point(tmp_path, ref):
    model_a, model_b = ref.mlp(0), ref.mlp(1)
    with torch.no_grad():
        model_b[8].weight.mul_(1e305)  # far out on the path the logits overflow
    data = ref.batches((3, 4))
    result = landscape(model_a, data, directions=model_b, steps=5, test_data=data[:1], out=tmp_path)
    # the logits there are NaN, whose argmax is class 0: the accuracy is NaN too, not the share of class-0 targets
    assert np.isnan(result.loss[-1]) and np.isnan(result.accuracy[-1]) and np.isnan(result.test_accuracy[-1])
    assert np.isfinite(result.loss[:-1]).all() and np.isfinite(result.accuracy[:-1]).all()
    stored = json.loads((tmp_path / "results" / "landscape.json").read_text())
    assert stored["loss"][-1] is None and stored["accuracy"][-1] is None  # strict JSON: no NaN
    assert stored["test_accuracy"][-1] is None
    rows = _stored_rows(tmp_path)[0]
    assert rows["loss"][-1] is None and rows["accuracy"][-1] is None
    again = landscape(model_a, data, directions=model_b, steps=5, test_data=data[:1], out=tmp_path)  # from the rows
    assert again.rows_resumed == 1 and np.isnan(again.accuracy[-1])
    np.testing.assert_array_equal(again.loss, result.loss)
    assert (tmp_path / "figures" / "landscape_line.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "results" / "landscape.vtp").exists()
    with np.load(tmp_path / "results" / "landscape.npz") as arrays:
        assert "y" not in arrays.files and arrays["clamped_variances"].shape == (5,)


def test_files_of_a_plane_with_diverging_points(tmp_path, ref):
    """VTK's ascii format has no NaN: points where the loss is not finite get each surface's worst value."""
    model_a, model_b, model_c = ref.mlp(0), ref.mlp(1), ref.mlp(2)
    with torch.no_grad():
        model_c[8].weight.mul_(1e305)
    result = landscape(model_a, ref.batches((3, 4)), directions=[model_b, model_c], steps=3, out=tmp_path)
    diverged = np.isnan(result.loss)
    assert diverged.any() and (~diverged).any()
    np.testing.assert_array_equal(np.isnan(result.accuracy), diverged)
    stored = json.loads((tmp_path / "results" / "landscape.json").read_text())
    assert [[v is None for v in row] for row in stored["accuracy"]] == diverged.tolist()
    vtp = (tmp_path / "results" / "landscape.vtp").read_text()
    assert "nan" not in vtp.lower() and "inf" not in vtp.lower()
    block = vtp.split('Name="train_accuracy" NumberOfComponents="1" format="ascii">')[1].split("</DataArray>")[0]
    written = np.array(block.split(), dtype=float).reshape(result.accuracy.shape)
    np.testing.assert_allclose(written[diverged], np.nanmin(result.accuracy), rtol=1e-8)
    np.testing.assert_allclose(written[~diverged], result.accuracy[~diverged], rtol=1e-8)
    for style in ("contour", "filled", "surface"):
        assert (tmp_path / "figures" / f"train_loss_{style}.png").read_bytes()[:8] == PNG


def _interrupted_after_two_rows(folder, ref):
    def stop_after_two(row, values):
        if row == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 5), out=folder, on_row=stop_after_two)


def test_rows_are_appended_one_line_each_not_rewritten(tmp_path, ref, monkeypatch):
    """Was: the whole rows file rewritten after every row (quadratic: a 100 × 100 grid took 18.7 s with a
    folder against 8.2 s without; now 8.9 s)."""
    from hessgap import _io

    rewrites = []
    write_text = _io.write_text
    monkeypatch.setattr("hessgap.landscape.folder.write_text",
                        lambda path, text: rewrites.append(path) or write_text(path, text))
    result = landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 5), out=tmp_path)
    assert not [path for path in rewrites if "rows" in str(path)]
    rows = _stored_rows(tmp_path)
    assert list(rows) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.array([rows[k]["loss"] for k in rows]), result.loss)


def test_a_last_line_cut_short_is_computed_again(tmp_path, ref):
    """A process killed while appending a row leaves half a line: ignored on resume, the file rewritten."""
    uninterrupted = landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 5), out=tmp_path / "straight")
    _interrupted_after_two_rows(tmp_path / "run", ref)
    path = tmp_path / "run" / "results" / "landscape.rows.jsonl"
    whole = path.read_text()
    path.write_text(whole + whole.splitlines()[1][:40])  # a third row, cut short
    resumed = landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 5), out=tmp_path / "run")
    assert resumed.rows_resumed == 2
    np.testing.assert_array_equal(resumed.loss, uninterrupted.loss)
    assert path.read_text() == (tmp_path / "straight" / "results" / "landscape.rows.jsonl").read_text()


def test_a_damaged_line_before_the_last_is_refused(tmp_path, ref):
    _interrupted_after_two_rows(tmp_path, ref)
    path = tmp_path / "results" / "landscape.rows.jsonl"
    first, second = path.read_text().splitlines()
    path.write_text(first[:40] + "\n" + second + "\n")
    with pytest.raises(HessgapError, match=r"landscape.rows.jsonl line 1 is damaged .*delete the file"):
        landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 5), out=tmp_path)


def test_a_folder_of_the_earlier_rows_layout_resumes(tmp_path, ref):
    """Earlier versions kept the rows in one JSON object, landscape.rows.json: read, then moved to lines."""
    uninterrupted = landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 5), out=tmp_path / "straight")
    _interrupted_after_two_rows(tmp_path / "run", ref)
    results = tmp_path / "run" / "results"
    rows = _stored_rows(tmp_path / "run")
    (results / "landscape.rows.json").write_text(json.dumps({"rows": {str(k): v for k, v in rows.items()}}))
    (results / "landscape.rows.jsonl").unlink()
    resumed = landscape(ref.mlp(), ref.batches((3, 4)), steps=(3, 5), out=tmp_path / "run")
    assert resumed.rows_resumed == 2
    np.testing.assert_array_equal(resumed.loss, uninterrupted.loss)
    assert not (results / "landscape.rows.json").exists()
    assert _stored_rows(tmp_path / "run") == _stored_rows(tmp_path / "straight")
