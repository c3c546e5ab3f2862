"""benchmarks/_timing.py, the benchmarks' one timing module: interleaved rounds and their statistics, costs in
gradients, methods that raise, peak memory in a fresh process, and the zoo runner's resilience and resumption."""

import functools
import json

import pytest
import torch

import _timing


class FakeClock(_timing.Clock):
    """A clock that advances by a scripted amount per call of each method (no real time involved)."""

    def __init__(self):
        super().__init__("wall")
        self.t = 0.0

    def now(self):
        return self.t


def test_interleaved_rounds_alternate_methods_and_give_medians_and_costs_in_gradients():
    clock = FakeClock()
    order = []
    costs = {"gradient": iter([1.0, 1.2, 0.8]), "hvp": iter([32.0, 40.0, 30.0])}

    def method(name):
        def run():
            order.append(name)
            clock.t += next(costs[name])
        return run

    rounds = _timing.interleaved({"gradient": method("gradient"), "hvp": method("hvp")}, 3, clock=clock,
                                 per={"hvp": 16}, warmup=0)
    assert order == ["gradient", "hvp"] * 3  # alternating, never one method's rounds in a block
    assert rounds.seconds["hvp"] == [2.0, 2.5, 1.875]  # per unit: seconds / 16
    assert rounds.median("gradient") == pytest.approx(1.0) and rounds.min("gradient") == pytest.approx(0.8)
    assert rounds.in_gradients() == {"hvp": pytest.approx(2.0)}
    assert rounds.in_gradients(how="min") == {"hvp": pytest.approx(1.875 / 0.8)}


def test_a_method_that_raises_is_recorded_and_dropped_not_fatal():
    calls = []

    def broken():
        calls.append(1)
        raise NotImplementedError("Trying to use forward AD with aten::silu_backward that does not support it.")

    rounds = _timing.interleaved({"gradient": lambda: None, "broken": broken}, 3, keep_going=True)
    assert len(calls) == 1 and "broken" not in rounds.seconds
    assert rounds.errors["broken"].startswith("NotImplementedError: Trying to use forward AD")
    assert len(rounds.seconds["gradient"]) == 3
    with pytest.raises(NotImplementedError):
        _timing.interleaved({"broken": broken}, 1)


def test_process_clock_counts_cpu_seconds_not_sleep():
    import time

    assert _timing.timed(lambda: time.sleep(0.2), "process") < 0.1
    assert _timing.timed(lambda: time.sleep(0.2), "wall") >= 0.2
    with pytest.raises(ValueError, match="clock must be one of"):
        _timing.Clock("cpu")


def test_set_threads_pins_and_restores():
    before = torch.get_num_threads()
    with _timing.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_peak_memory_of_a_method_in_a_fresh_process():
    """64 MiB allocated by the call show as about 64 MiB above the baseline; the model and data made by the
    setup (here: a 64 MiB tensor made before the call) do not count."""
    mib = 2**20
    big = _timing.peak_memory(functools.partial, torch.ones, (16 * mib,))  # 16M float32 = 64 MiB
    assert 56 * mib < big["bytes"] < 100 * mib, big
    small = _timing.peak_memory(functools.partial, torch.ones, (16,))
    assert small["bytes"] < 8 * mib, small
    with pytest.raises(RuntimeError, match="in the memory child: .*Error"):
        _timing.peak_memory(functools.partial, torch.ones, ("not a size",))


def test_machine_description_names_cpu_torch_and_threads():
    info = _timing.machine()
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    line = _timing.describe_machine(info)
    assert torch.__version__ in line and "thread" in line


def test_zoo_run_survives_a_raising_config_and_resumes_from_its_json(tmp_path, monkeypatch, capsys):
    import zoo
    import zoo_models

    def broken(size):
        raise RuntimeError("this model cannot be built")

    monkeypatch.setitem(zoo_models.CONFIGS, "broken", zoo_models.Config(broken))
    out, results = tmp_path / "zoo.json", tmp_path / "RESULTS.md"
    results.write_text("# figures\n")
    argv = ["--models", "broken", "mlp", "--size", "tiny", "--rounds", "1", "--no-memory", "--skip", "curvlinops",
            "--json", str(out), "--results", str(results)]
    with _timing.threads(torch.get_num_threads()):  # the run pins one thread; the other tests keep theirs
        zoo.main(argv)
    records = json.loads(out.read_text())["configs"]
    assert "RuntimeError: this model cannot be built" in records["broken"]["error"]
    assert records["mlp"]["path"] == "fused" and records["mlp"]["check"]["exact"]
    assert set(records["mlp"]["in_gradients"]) == {"hessgap", "retained_graph"}
    text = results.read_text()
    assert "## Model zoo" in text and "| mlp |" in text and "this model cannot be built" in text
    capsys.readouterr()
    with _timing.threads(torch.get_num_threads()):
        zoo.main(argv)  # the finished configuration is skipped, the failed one tried again
    printed = capsys.readouterr().out
    assert "[mlp] measured already" in printed and "[broken] measured already" not in printed
    assert results.read_text().count("## Model zoo") == 1


def test_zoo_keeps_partial_figures_and_measures_an_interrupted_config_again(tmp_path, capsys):
    import zoo

    out = tmp_path / "zoo.json"
    argv = ["--models", "mlp", "--size", "tiny", "--rounds", "2", "--no-memory", "--skip", "curvlinops",
            "--json", str(out)]
    kept = []
    args = zoo.argparse.Namespace(size="tiny", check_vectors=2, device="cpu", k=4, baseline_vectors=2, skip=["curvlinops"],
                                  curvlinops_block=4, rounds=2, clock="process", no_memory=True, threads=None)
    zoo.measure("mlp", args, lambda line: None, keep=lambda record: kept.append(json.loads(json.dumps(record))))
    stages = [("check" in r, "path" in r, len(r.get("timing", {}).get("seconds_per_round", {}).get("gradient", [])))
              for r in kept]
    assert stages == [(True, False, 0), (True, True, 0), (True, True, 1), (True, True, 2)]
    # a run stopped inside mlp left it "running": the next run measures it again, a second stop gives up on it
    out.write_text(json.dumps({"configs": {"mlp": {"config": "mlp", "size": "tiny", "status": "running"}}}))
    with _timing.threads(torch.get_num_threads()):
        zoo.main(argv)
    assert json.loads(out.read_text())["configs"]["mlp"]["status"] == "done"
    assert "error" not in json.loads(out.read_text())["configs"]["mlp"]
    out.write_text(json.dumps({"configs": {"mlp": {"config": "mlp", "size": "tiny", "status": "running",
                                                   "interrupted": True}}}))
    capsys.readouterr()
    with _timing.threads(torch.get_num_threads()):
        zoo.main(argv)
    assert "[mlp] measured already" in capsys.readouterr().out
    assert "stopped twice" in json.loads(out.read_text())["configs"]["mlp"]["error"]
