"""TrainConfig: options round-trip through JSON, bad options raise naming themselves, sb/lb shorthands."""

import json
import math

import pytest

from hessgap.errors import HessgapError
from hessgap.train import TrainConfig, train

from tiny_runs import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sb_and_lb_shorthands_and_sgd(digits):
    lb = train(tiny(batch_size="lb", epochs=1), dataset=digits, progress=False)
    assert lb.history[0]["batch_size"] == 144
    sgd = train(tiny(optimizer="sgd", lr=0.05, epochs=1, batch_size="sb"), dataset=digits, progress=False)
    assert sgd.history[0]["batch_size"] == 256 and math.isfinite(sgd.final["train_loss"])


def test_config_round_trip_and_bad_options(digits):
    config = tiny(remedy="dynamic", batch_schedule=(16, 64, 1.5))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(HessgapError, match="unknown training option.*colour"):
        TrainConfig.from_dict({"colour": "red"})
    bad = [
        (dict(model="VGG16"), "F1, F2, C1"), (dict(optimizer="rmsprop"), "adam, sgd"),
        (dict(remedy="mixup"), "augment"), (dict(batch_size=0), "batch_size"), (dict(batch_size="xl"), "'sb' or 'lb'"),
        (dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(batch_schedule=(1, 2, 3.0)), "remedy='dynamic'"),
        (dict(device="tpu9"), "device"), (dict(sharpness_every=-1), "sharpness_every"),
    ]
    for options, message in bad:
        with pytest.raises(HessgapError, match=message):
            train(tiny(**options), dataset=digits, progress=False)
    with pytest.raises(HessgapError, match="larger than the training set of digits \\(1437 samples\\)"):
        train(tiny(batch_size=5000), dataset=digits, progress=False)
    with pytest.raises(HessgapError, match="digits, mnist1d, mnist"):
        train(tiny(dataset="svhn"), progress=False)
    with pytest.raises(HessgapError, match="names data set 'mnist1d' but the Dataset passed is 'digits'"):
        train(tiny(dataset="MNIST-1D"), dataset=digits, progress=False)
    assert train(tiny(model="f1", dataset="Digits", epochs=1), dataset=digits, progress=False).config.model == "F1"


@pytest.mark.parametrize("options, message", [
    (dict(seed="a"), "seed must be an integer ≥ 0, got 'a'"),
    (dict(seed=1.5), "seed must be an integer ≥ 0, got 1.5"),
    (dict(seed=-1), "seed must be an integer ≥ 0, got -1"),
    (dict(seed=True), "seed must be an integer ≥ 0, got True"),
    (dict(data_seed=1.5), "data_seed must be an integer ≥ 0, got 1.5"),
    (dict(data_seed="0"), "data_seed must be an integer ≥ 0, got '0'"),
])
def test_seeds_must_be_integers(digits, options, message):
    with pytest.raises(HessgapError, match=message):
        train(tiny(**options), dataset=digits, progress=False)


def test_numpy_integer_seeds_are_plain_integers(digits):
    import numpy as np

    config = tiny(seed=np.int64(3), data_seed=np.int32(0)).validate()
    assert type(config.seed) is int and type(config.data_seed) is int and config.seed == 3


def test_the_papers_options_are_checked(digits):
    bad = [
        (dict(init="he"), "unknown init 'he'; choose one of pytorch, glorot"),
        (dict(preprocess="whiten"), "unknown preprocess 'whiten'; choose one of standardize, none"),
        (dict(sharpness_solver="adam"), "unknown sharpness_solver 'adam'"),
        (dict(sharpness_batchnorm="batch"), "unknown sharpness_batchnorm 'batch'; choose one of eval, train"),
        (dict(conv_dropout="yes"), "conv_dropout must be True or False, got 'yes'"),
    ]
    for options, message in bad:
        with pytest.raises(HessgapError, match=message):
            train(tiny(**options), dataset=digits, progress=False)


def test_runs_recorded_before_the_papers_options_resume(digits, tmp_path):
    from hessgap.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
    from hessgap.train.config import ADDED_DEFAULTS

    config = tiny(epochs=1)
    train(config, out_dir=tmp_path, dataset=digits, progress=False)
    path = checkpoint_path(tmp_path, 1)
    state = load_checkpoint(path)
    for key in ADDED_DEFAULTS:  # as a run written before these options existed
        del state["config"][key]
    save_checkpoint(path, state)
    resumed = train(tiny(epochs=2), out_dir=tmp_path, dataset=digits, progress=False)
    assert resumed.resumed_from == 1 and len(resumed.history) == 2
    with pytest.raises(HessgapError, match="init='pytorch', but this configuration has init='glorot'"):
        train(tiny(epochs=3, init="glorot"), out_dir=tmp_path, dataset=digits, progress=False)
