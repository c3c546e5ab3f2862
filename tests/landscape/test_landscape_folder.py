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
    rows = json.loads((tmp_path / "run" / "results" / "landscape.rows.json").read_text())["rows"]
    assert sorted(rows) == ["0", "1"]  # the row whose callback raised was saved before
    assert not (tmp_path / "run" / "results" / "landscape.json").exists()

    seen.clear()
    resumed = run_landscape(tmp_path / "run", model, data, directions=directions, steps=(3, 5), progress=False,
                            on_row=lambda row, values: seen.append(row))
    assert seen == [2, 3, 4] and resumed.rows_resumed == 2 and resumed.passes == 3
    assert torch.equal(resumed.directions, uninterrupted.directions)
    np.testing.assert_allclose(resumed.loss, uninterrupted.loss, rtol=1e-12)
    np.testing.assert_allclose(resumed.accuracy, uninterrupted.accuracy)
    assert resumed.eigenvalues == uninterrupted.eigenvalues

    seen.clear()
    again = run_landscape(tmp_path / "run", model, data, directions=directions, steps=(3, 5), progress=False,
                          on_row=lambda row, values: seen.append(row))
    assert seen == [] and again.rows_resumed == 5 and again.engine == resumed.engine
    np.testing.assert_array_equal(again.loss, resumed.loss)


def test_a_folder_of_other_settings_or_models_is_refused(tmp_path, ref):
    model, data = ref.mlp(), ref.batches((3, 4))
    landscape(model, data, steps=3, out=tmp_path)
    with pytest.raises(HessgapError, match="other settings .*steps: 3 in the folder, 4 now"):
        landscape(model, data, steps=4, out=tmp_path)
    with pytest.raises(HessgapError, match="other models"):
        landscape(ref.mlp(seed=5), data, steps=3, out=tmp_path)
    n = sum(p.numel() for p in model.parameters())
    landscape(model, data, directions=torch.ones(2, n, dtype=torch.float64), steps=3, out=tmp_path / "given")
    with pytest.raises(HessgapError, match="other models .*directions"):
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
    rows = json.loads((tmp_path / "results" / "landscape.rows.json").read_text())["rows"]["0"]
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
