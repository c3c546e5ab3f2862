"""Run folders: a folder refuses other settings (but not another device), a damaged result names itself."""

import pytest

from hessgap.errors import HessgapError
from hessgap.experiments import RunFolder

from tiny_runs import tiny_settings


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


def test_a_folder_names_a_change_of_the_measured_model(tmp_path):
    RunFolder(tmp_path / "old", "sharpness", {"model": "run", "epsilons": [1e-3]}).open().close()
    with pytest.raises(HessgapError, match="model_sha256: the folder does not record which model file it measured"):
        RunFolder(tmp_path / "old", "sharpness", {"model": "run", "epsilons": [1e-3], "model_sha256": "ab" * 32}).open()
    RunFolder(tmp_path / "new", "sharpness", {"model": "run", "model_sha256": "ab" * 32}).open().close()
    with pytest.raises(HessgapError, match=r"the saved model changed since this folder measured it \(sha256 "
                                           r"abababababab then, cdcdcdcdcdcd now\): it was trained further"):
        RunFolder(tmp_path / "new", "sharpness", {"model": "run", "model_sha256": "cd" * 32}).open()
