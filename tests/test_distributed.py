"""hessgap.distributed: sums across gloo ranks, agreement checks, and failures raised on every rank."""

import numpy as np
import pytest
import torch

from hessgap.distributed import Ranks
from hessgap.errors import HessgapError

from oracles import explicit_hessian
from rank_workers import collectives
from ranks import run_ranks


def test_single_process_is_a_no_op():
    ranks = Ranks.resolve()
    assert not ranks.active and ranks.world_size == 1
    assert ranks.sum_numbers([1.5, 2]) == [1.5, 2.0]
    ranks.agree("anything", object())
    with pytest.raises(ValueError, match="own error"):
        ranks.settle(ValueError("own error"))


def test_group_without_initialized_process_group_is_refused():
    with pytest.raises(HessgapError, match="init_process_group"):
        Ranks.resolve(group=object())


@pytest.mark.parametrize("world_size", [2, 3])
def test_collectives_on_gloo_ranks(world_size):
    results = run_ranks(collectives, world_size)
    total = world_size * (world_size + 1) / 2
    for rank, out in enumerate(results):
        assert out["describe"] == {"distributed": True, "backend": "gloo", "world_size": world_size, "rank": rank}
        assert out["sum"] == [total] * 3
        ranks_sum = sum(range(world_size))
        assert out["bucket"][0] == [[ranks_sum] * 2] * 2
        assert out["bucket"][1] == [ranks_sum + world_size * i for i in range(3)]
        assert out["bucket"][2] == [ranks_sum]
        assert out["numbers"] == [world_size, ranks_sum]
        # a dict's differing entries are named, each with every rank's value
        assert "ranks disagree on the model's shapes (weight: rank 0: (3, 0), rank 1: (3, 1)" in out["disagree"]
        if rank == world_size - 1:
            assert out["settle"] == "ValueError: bad batch on the last rank"
        else:
            assert out["settle"].startswith(f"HessgapError: rank {world_size - 1} of {world_size} failed")


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_public_call_on_shards_equals_one_process_on_all_data(world_size):
    from rank_workers import batches_of, every_public_call, measure_on_shards, tiny_problem

    results = run_ranks(measure_on_shards, world_size)
    model, x, y = tiny_problem()
    single = every_public_call(batches_of(x, y), model)
    for rank_result in results[1:]:
        assert rank_result == results[0]  # every rank returns the very same numbers
    for name, expected in single.items():
        got = np.asarray(results[0][name], dtype=np.float64)
        np.testing.assert_allclose(got, np.asarray(expected, dtype=np.float64), rtol=1e-6, atol=1e-10,
                                   err_msg=name)


def test_an_empty_shard_or_disagreeing_ranks_raise_on_every_rank():
    from rank_workers import bad_shards

    results = run_ranks(bad_shards, 2)
    assert "yielded no batches" in results[1]["empty"]
    assert results[0]["empty"].startswith("rank 1 of 2 failed")
    for outcome in results:
        assert "ranks disagree on the arguments of hessgap.sharpness" in outcome["disagree"]


def test_ranks_holding_different_weights_raise_on_every_rank():
    """Was: only the parameters' shapes were compared, and each rank measured its own model."""
    from rank_workers import different_weights

    results = run_ranks(different_weights, 2)
    differing = {"perturbed": "parameter 3.weight", "swapped": "parameter 0.weight", "statistic": "buffer 1.running_mean",
                 "replaced": "parameter 3.bias"}
    assert results[0] == results[1]  # every rank raises the same error
    assert len(results[0]) == 3 * 6 + 1
    for case, message in results[0].items():
        assert message is not None, case
        assert f"the ranks hold different values in {differing[case.split()[0]]} (rank 1 differs from rank 0)" in message
        assert "Load the same checkpoint on every rank" in message


def test_fingerprints_are_exact_and_see_every_change():
    """The fingerprint against its definition in Python integers, over chunk boundaries and every kind of dtype;
    one ulp, a swap and a moved zero change it, a copy and a non-contiguous view with the same values do not."""
    from hessgap.distributed import FINGERPRINT_PRIME, fingerprints

    def exact(t):
        flat = t.contiguous().reshape(-1)
        flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat
        words = flat.view(torch.int8 if flat.element_size() == 1 else torch.int16).tolist()
        return sum(u * (i % 2**29 + 1) for i, u in enumerate(words)) % FINGERPRINT_PRIME

    torch.manual_seed(0)
    x = torch.randn(300_001)
    tensors = [x, torch.randn(7, 3, dtype=torch.float64), torch.randn(5).half(), torch.randn(9).bfloat16(),
               torch.rand(9) > 0.5, torch.zeros(0)]
    assert fingerprints(tensors).tolist() == [exact(t) for t in tensors]
    one_ulp, swapped, moved = x.clone(), x.clone(), torch.zeros(10)
    one_ulp[123_456] = torch.nextafter(x[123_456], torch.tensor(10.0))
    swapped[3], swapped[299_999] = x[299_999], x[3]
    moved[2] = -0.0  # the same value as 0.0, other bits
    matrix = torch.randn(40, 30)
    prints = fingerprints([x, x.clone(), one_ulp, swapped, torch.zeros(10), moved, matrix.t().contiguous(),
                           matrix.t()]).tolist()
    assert prints[0] == prints[1] and len({prints[0], prints[2], prints[3]}) == 3
    assert prints[4] != prints[5] and prints[6] == prints[7]


def test_fsdp2_sharded_products_and_spectrum_equal_one_process_on_all_data():
    """FSDP2 shards: H·V comes back sharded like the parameters and equals the full product's rows; the
    eigenvalues (Lanczos on sharded vectors) equal one process's; the trace agrees within its error; the
    density (refused before) runs on sharded probes with every inner product summed over the ranks: 40 Lanczos
    steps on 80 parameters reach both ends of one process's exact spectrum, and each probe's weights sum to 1;
    block spectra (refused before) equal one process's top-2 per block, their traces the exact ones."""
    import hessgap

    from rank_workers import batches_of, fsdp_shards_of, sharded_hessian, tiny_problem

    world_size = 2
    results = run_ranks(sharded_hessian, world_size)
    model, x, y = tiny_problem()
    data = batches_of(x, y, size=16)
    shapes = [p.shape for p in model.parameters()]
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    V = torch.randn(2, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = hessgap.hvp(model, data, V).reshape(2, -1)
    pieces = full.split([int(torch.Size(s).numel()) for s in shapes], dim=1)
    top = hessgap.eigenvalues(model, data, k=3, tol=1e-8, max_iter=300).eigenvalues
    exact = torch.linalg.eigvalsh(explicit_hessian(model, data))
    exact_trace = float(exact.sum())
    one_process_blocks = hessgap.block_spectrum(model, data, k=2, tol=1e-8, num_probes=0)
    diagonal = explicit_hessian(model, data).diagonal()
    sizes = one_process_blocks.sizes
    block_traces = [float(part.sum()) for part in diagonal.split(sizes)]
    for rank, out in enumerate(results):
        expected = torch.cat([fsdp_shards_of(piece.reshape((2,) + tuple(s)), rank, world_size).reshape(2, -1)
                              for piece, s in zip(pieces, shapes)], dim=1)
        torch.testing.assert_close(torch.tensor(out["hv"], dtype=torch.float64), expected, rtol=1e-9, atol=1e-12)
        assert out["path"] == "sharded" and out["n"] == n
        np.testing.assert_allclose(out["eigenvalues"], top, rtol=1e-6)
        assert abs(out["trace"] - exact_trace) <= 4 * out["stderr"]
        assert "does not take FSDP2-sharded models" in out["refused"]
        spectrum = out["density"]
        assert spectrum["path"] == "sharded" and spectrum["n"] == n
        np.testing.assert_allclose([spectrum["largest"], spectrum["smallest"]], [float(exact[-1]), float(exact[0])],
                                   rtol=1e-6, atol=1e-9 * float(exact[-1]))
        np.testing.assert_allclose(spectrum["weights"], 1.0, rtol=1e-9)
    assert results[0]["eigenvalues"] == results[1]["eigenvalues"]
    assert results[0]["density"] == results[1]["density"]
    for out in results:
        blocks = out["blocks"]
        assert blocks["path"] == "sharded" and all(blocks["converged"])
        assert (blocks["names"], blocks["sizes"]) == (one_process_blocks.blocks, sizes)
        for got, want in zip(blocks["eigenvalues"], one_process_blocks.eigenvalues):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
        for got, err, want in zip(blocks["traces"], blocks["stderr"], block_traces):
            assert abs(got - want) <= 5 * err + 1e-9
    assert results[0]["blocks"] == results[1]["blocks"]


def test_ddp_training_follows_one_process_and_resumes_on_any_world_size(tmp_path, monkeypatch):
    """2 ranks with DistributedDataParallel on the one-process global batch reach the one-process weights;
    a run stopped after one epoch on 2 ranks resumes (on 2 ranks, or in one process) with nothing lost."""
    from hessgap.train import TrainConfig, loop, train

    from rank_workers import _mlp_without_batchnorm, ddp_training

    monkeypatch.setattr(loop, "build_model", _mlp_without_batchnorm)
    single = train(TrainConfig(model="F1", dataset="digits", batch_size=100, epochs=2, seed=4, sharpness_every=1,
                               sharpness_batches=1, device="cpu"), progress=False)
    straight = run_ranks(ddp_training, 2, str(tmp_path / "straight"), 2)
    for rank_result in straight:
        for ours, theirs in zip(rank_result["weights"], single.model.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(rank_result["history"], single.history):
            for key in ("train_loss", "test_loss", "train_acc", "test_acc", "distance_from_start", "sharpness"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key
    run_ranks(ddp_training, 2, str(tmp_path / "stopped"), 1)  # interrupted after epoch 1
    resumed = run_ranks(ddp_training, 2, str(tmp_path / "stopped"), 2)
    assert resumed[0]["resumed_from"] == 1
    for ours, theirs in zip(resumed[0]["weights"], straight[0]["weights"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # the checkpoints do not depend on the world size: one process takes the run over
    run_ranks(ddp_training, 2, str(tmp_path / "handover"), 1)
    one = train(TrainConfig(model="F1", dataset="digits", batch_size=100, epochs=2, seed=4, sharpness_every=1,
                            sharpness_batches=1, device="cpu"), out_dir=tmp_path / "handover", progress=False)
    assert one.resumed_from == 1
    for ours, theirs in zip(one.model.parameters(), straight[0]["weights"]):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-6)


def _same_result(got: dict, expected: dict, rtol: float = 1e-6) -> None:
    """Two hessgap.measures results (as dicts, timings left out) agree: every number within ``rtol``, the rest
    exactly."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            _same_result(got[key], value, rtol)
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=rtol, abs=1e-12), key
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            np.testing.assert_allclose(got[key], value, rtol=rtol, atol=1e-12, err_msg=key)
        else:
            assert got[key] == value, key


def test_every_measure_on_shards_equals_one_process_on_all_data():
    """Every measure of the registry over three unequal shards equals one process's on all the data, with the
    invariance check, and every rank returns the same result (fisher_rao and PAC-Bayes were taken per shard,
    m-sharpness over per-rank batches: 50 % off, or the ranks hung when their shards held unequal numbers of
    batches of m)."""
    world_size = 3
    from hessgap.measures import DEFAULT_NAMES

    from rank_workers import batches_of, every_measure, measures_on_shards, trained_problem

    results = run_ranks(measures_on_shards, world_size)
    model, x, y = trained_problem()
    single = every_measure(batches_of(x, y), model)
    assert list(single["values"]) == list(DEFAULT_NAMES) and not single["not_applicable"]
    assert single["num_samples"] == 61
    for rank_result in results[1:]:
        _same_result(rank_result, results[0], rtol=1e-12)  # every rank returns the same numbers
    _same_result(results[0], single)


def test_measures_arguments_wrong_or_different_on_some_ranks_raise_the_same_error_on_every_rank():
    """A rank whose measure names, settings, seed or factors differ (or are wrong) made the others wait in a
    collective (gloo aborted) or raised a raw error on one rank only; now every rank raises the same error."""
    import hessgap
    from hessgap.measures import NAMES

    from rank_workers import batches_of, measures_with_bad_arguments, tiny_problem

    results = run_ranks(measures_with_bad_arguments, 2)
    assert results[0] == results[1]
    raised = results[0]
    for what in ("names", "steps", "seed", "factor"):
        assert raised[what].startswith("the ranks disagree on the arguments of hessgap.measures"), what
    assert "HessgapError: unknown measure 'sharpest'" in raised["names"]
    assert raised["type"].startswith("names must be None") and ", ".join(NAMES) in raised["type"]
    assert "relu_factor=1.0 is too close to 1" in raised["vacuous"]
    assert raised["agreed"] == "NotApplicable: rank 1's batches are not pairs"
    model, x, y = tiny_problem()
    single = hessgap.measures(model, batches_of(x, y), ["fisher_rao"], check_invariance=False)
    assert raised["after"] == pytest.approx(single.values["fisher_rao"], rel=1e-9)


def test_llc_on_two_ranks_equals_one_process_on_the_union_batches():
    """Each SGLD step takes batch j of every rank: the chains are those of one process whose batch j is the
    union, with the same seeded noise on every rank, and so are the diagnostics (λmax, gradient noise)."""
    from rank_workers import llc_on_shards, llc_problem, llc_result

    results = run_ranks(llc_on_shards, 2)
    assert results[0] == results[1]
    model, _, unions = llc_problem()
    single = llc_result(model, unions)
    for key in ("value", "per_chain", "traces", "loss_traces", "step_units", "n_beta", "units", "lmax"):
        np.testing.assert_allclose(np.asarray(results[0][key], dtype=np.float64),
                                   np.asarray(single[key], dtype=np.float64), rtol=1e-6, atol=1e-9, err_msg=key)
    for ours, theirs in zip(results[0]["diagnostics"], single["diagnostics"]):
        assert ours["check"] == theirs["check"] and ours["ok"] == theirs["ok"]
        if ours["value"] is not None:
            assert ours["value"] == pytest.approx(theirs["value"], rel=1e-5, abs=1e-9), ours["check"]


def test_llc_with_a_bad_batch_on_one_rank_raises_on_every_rank():
    from rank_workers import llc_with_a_bad_batch

    raised = run_ranks(llc_with_a_bad_batch, 2)
    assert "batch 1" in raised[1] and "the model has 3 classes" in raised[1]
    assert raised[0].startswith("rank 1 of 2 failed")


def test_fsdp2_a_batch_that_fails_on_one_rank_raises_on_every_rank():
    """Was a hang: the rank whose batch did not fit the model raised in its forward, while the others waited
    in the backward's collectives of the sharded pass."""
    from rank_workers import sharded_batch_failing_on_one_rank

    results = run_ranks(sharded_batch_failing_on_one_rank, 2, timeout=120)
    assert all(message is not None for message, _ in results), results
    assert "shapes cannot be multiplied" in results[1][0] and "rank 1" in results[0][0], results
    assert all(seconds < 30 for _, seconds in results), results
