"""Run folders: a folder refuses other settings (but not another device), a damaged result names itself, and a
command that fails before it finished anything leaves the folder as it found it."""

import pytest

from hessgap import _io
from hessgap.errors import HessgapError
from hessgap.experiments import RunFolder
from hessgap.experiments.runs import claimed

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


# ------------------------------------------------------------------------------------------ a failed command leaves
# nothing behind when it finished nothing (was: its config.json refused the corrected rerun as other settings)

def _fail_inside(folder: RunFolder, work=lambda folder: None):
    with pytest.raises(RuntimeError, match="failed"):
        with folder.open() as opened:
            work(opened)
            raise RuntimeError("failed")


def _checkpoint(path, epoch):
    (path / "checkpoints").mkdir(exist_ok=True)
    (path / "checkpoints" / f"epoch_{epoch:04d}.pt").write_bytes(b"weights")


def test_a_command_that_finished_nothing_removes_its_folder_and_the_parents_it_made(tmp_path):
    settings = {"epsilons": [1e30]}
    _fail_inside(RunFolder(tmp_path / "runs" / "deep" / "s", "sharpness", settings),
                 lambda f: (f.log("measuring"), f.figures_dir.mkdir(), _checkpoint(f.path, 0)))
    assert list(tmp_path.iterdir()) == []
    RunFolder(tmp_path / "runs" / "deep" / "s", "sharpness", {"epsilons": [1e-3]}).open().close()  # not refused


def test_a_command_that_finished_something_keeps_all_of_it(tmp_path):
    _fail_inside(RunFolder(tmp_path / "s", "sharpness", {"epsilons": [1e-3, 1e30]}),
                 lambda f: f.parts("model_sharpness").put("full/eps0.001", {"value": 1.0}))
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"config.json", "results", _io.LOCK_FILE}
    _fail_inside(RunFolder(tmp_path / "t", "train", {}),
                 lambda f: _checkpoint(f.path, 1))
    assert (tmp_path / "t" / "checkpoints" / "epoch_0001.pt").is_file() and (tmp_path / "t" / "config.json").is_file()


def test_in_a_folder_that_existed_only_what_the_command_added_goes(tmp_path):
    (tmp_path / "mine.txt").write_text("the user's")
    RunFolder(tmp_path, "sharpness", {"epsilons": [1e-3]}).open().close()
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    _fail_inside(RunFolder(tmp_path, "sharpness", {"epsilons": [1e-3]}), lambda f: f.log("again"))
    assert sorted(tmp_path.iterdir()) == sorted(before) and (tmp_path / "mine.txt").read_text() == "the user's"
    (tmp_path / "empty").mkdir()
    _fail_inside(RunFolder(tmp_path / "empty", "sharpness", {}))
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []


def test_a_folder_in_use_by_another_process_is_left_alone(tmp_path):
    from lock_holder import other_process_holding

    with other_process_holding(tmp_path / "run"):
        with pytest.raises(HessgapError, match="in use by another hessgap process"):
            RunFolder(tmp_path / "run", "sharpness", {}).open()
        assert (tmp_path / "run" / _io.LOCK_FILE).is_file()


def test_a_claimed_folder_follows_the_same_rule(tmp_path):
    with pytest.raises(HessgapError, match="bad steps"):
        with claimed(tmp_path / "landscape") as path:
            (path / "config.json").write_text("{}")
            raise HessgapError("bad steps")
    assert not (tmp_path / "landscape").exists()
    with claimed(tmp_path / "landscape") as path:
        (path / "config.json").write_text("{}")
    assert (tmp_path / "landscape" / "config.json").is_file()  # a command that succeeds keeps everything
