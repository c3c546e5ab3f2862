"""Settings and presets: validation, the epoch budget between SB and LB, the named presets."""

import pytest

from hessgap.errors import HessgapError
from hessgap.experiments import Settings, preset

from tiny_runs import tiny_settings


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


@pytest.mark.parametrize("name, value", [("seed", 1.5), ("seed", -2), ("data_seed", "a")])
def test_settings_seeds_must_be_integers(name, value):
    with pytest.raises(HessgapError, match=f"{name} must be an integer ≥ 0"):
        tiny_settings(**{name: value})


@pytest.mark.parametrize("name, value, match", [
    ("epsilons", (float("nan"),), "every sharpness epsilon must be a finite number > 0"),  # was: accepted
    ("epsilons", (float("inf"),), "every sharpness epsilon must be a finite number > 0"),
    ("alpha_range", (float("nan"), 2.0), "alpha_range must be finite"),  # was: accepted (nan >= 2 is False)
    ("alpha_range", (-1.0, float("inf")), "alpha_range must be finite"),
])
def test_settings_refuse_nonfinite_numbers(name, value, match):
    with pytest.raises(HessgapError, match=match):
        tiny_settings(**{name: value})
