"""block_spectrum: top eigenvalues and traces of every diagonal block against explicit block Hessians."""

import warnings

import pytest
import torch
from torch import nn

import hessgap
from hessgap.errors import HessgapError

from oracles import assert_unchanged, explicit_hessian, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for n in (9, 5)]
    return model, data


def block_of(model, data, names):
    return explicit_hessian(model, data, params=names)


def members(model, prefix):
    return [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[0] == prefix]


def test_module_blocks_match_the_explicit_blocks():
    model, data = model_and_data()
    before = snapshot(model)
    result = hessgap.block_spectrum(model, data, k=2, tol=1e-10, num_probes=200, seed=3)
    assert_unchanged(model, before)
    assert result.blocks == ["0", "1", "3", "5"]  # one per module that owns parameters, in model order
    assert result.sizes == [25, 10, 24, 15] and result.n == 74
    assert all(result.converged) and result.k == 2 and result.num_probes == 200
    deviations = []
    for block, values, trace, stderr in zip(result.blocks, result.eigenvalues, result.traces, result.trace_stderr):
        H = block_of(model, data, members(model, block))
        exact = torch.linalg.eigvalsh(H).flip(0)
        assert values == pytest.approx(exact[:2].tolist(), rel=1e-8, abs=1e-10), block
        deviations.append(abs(trace - float(H.trace())) / stderr)
    assert max(deviations) < 4  # Hutchinson's estimates within a few standard errors
    assert result.passes < result.hvps  # every pass serves all blocks


def test_passes_are_shared_by_the_blocks(capsys):
    model, data = model_and_data()
    result = hessgap.block_spectrum(model, data, k=1, tol=1e-10, num_probes=8, progress=True)
    assert "block lanczos" in capsys.readouterr().err
    # the slowest block's Lanczos steps plus one pass for all probes of all blocks
    assert result.passes <= 25 + 1
    assert result.hvps > 2 * result.passes


def test_parameter_blocks_and_named_blocks():
    model, data = model_and_data()
    result = hessgap.block_spectrum(model, data, blocks="parameter", k=1, tol=1e-10, num_probes=0)
    assert result.blocks == [name for name, _ in model.named_parameters()] and result.traces is None
    for block, values in zip(result.blocks, result.eigenvalues):
        H = block_of(model, data, [block])
        assert values[0] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8, abs=1e-10)

    as_list = hessgap.block_spectrum(model, data, blocks=["3", "0"], k=1, tol=1e-10, num_probes=0)
    assert as_list.blocks == ["3", "0"] and as_list.sizes == [24, 25]
    mixed = {"first weight and norm": [model[0].weight, "1"], "heads": model[5], "overlapping": ["1.weight", "5.bias"]}
    result = hessgap.block_spectrum(model, data, blocks=mixed, k=1, tol=1e-10, num_probes=0)
    assert result.blocks == list(mixed) and result.sizes == [30, 15, 8]
    for block, spec in zip(result.blocks, (["0.weight", "1.weight", "1.bias"], ["5.weight", "5.bias"], ["1.weight", "5.bias"])):
        H = block_of(model, data, spec)
        assert result.eigenvalues[result.blocks.index(block)][0] == pytest.approx(
            float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8, abs=1e-10)


def test_params_restricts_the_blocks():
    model, data = model_and_data()
    result = hessgap.block_spectrum(model, data, params=["3", "5.weight"], k=1, num_probes=0, tol=1e-10)
    assert result.blocks == ["3", "5"] and result.sizes == [24, 12] and result.n == 36
    with pytest.raises(HessgapError, match="block '0' holds none of the parameters this call works on"):
        hessgap.block_spectrum(model, data, params="3", blocks=["0"])


def test_a_block_smaller_than_k_gives_all_its_eigenvalues():
    model, data = model_and_data()
    result = hessgap.block_spectrum(model, data, blocks={"bias": "5.bias"}, k=5, tol=1e-10, num_probes=0)
    exact = torch.linalg.eigvalsh(block_of(model, data, ["5.bias"])).flip(0)
    assert result.eigenvalues[0] == pytest.approx(exact.tolist(), rel=1e-8, abs=1e-10)


def test_the_plot(tmp_path):
    model, data = model_and_data()
    result = hessgap.block_spectrum(model, data, k=1, num_probes=4, save_png=str(tmp_path / "blocks.png"))
    assert (tmp_path / "blocks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # negative curvature (here: the smallest eigenvalues and an indefinite block's trace) is drawn too
    result.eigenvalues = [[-abs(v[0])] for v in result.eigenvalues]
    result.traces = [-1.0, 2.0, -3.0, 0.0]
    path = result.plot(str(tmp_path / "negative.png"), title="negative")
    assert path.endswith("negative.png") and (tmp_path / "negative.png").stat().st_size > 1000
    result.traces = None
    result.plot(str(tmp_path / "no-traces.png"))
    assert (tmp_path / "no-traces.png").exists()


def test_the_plots_axis_shows_negative_and_zero_values():
    from hessgap.spectrum.blocks import axis_scale

    assert axis_scale([3.0, 0.5]) == ("log", None)
    assert axis_scale([3.0, -0.5]) == ("symlog", 0.5)
    assert axis_scale([1e4, 0.0, 1e-9]) == ("symlog", 10.0)  # at most 1e4 decades of linear part
    assert axis_scale([0.0]) == ("symlog", 1.0)


@pytest.mark.parametrize("options, message", [
    (dict(blocks="modules"), "blocks must be one of module, parameter"),
    (dict(blocks=[]), "blocks= is empty"),
    (dict(blocks={}), "blocks= is empty"),
    (dict(blocks=["0", "9"]), "'9', which is neither a parameter nor a module"),
    (dict(blocks={"x": "0.wieght"}), "did you mean 0.weight"),
    (dict(blocks=3), "blocks= is a int"),
    (dict(blocks=[nn.Linear(2, 2)]), "not a submodule with parameters of this model"),
    (dict(k=0), "k must be"),
    (dict(num_probes=-1), "num_probes"),
    (dict(tol=2.0), "tol is a relative tolerance"),
])
def test_bad_blocks_are_named(options, message):
    model, data = model_and_data()
    with pytest.raises(HessgapError, match=message):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hessgap.block_spectrum(model, data, **options)
