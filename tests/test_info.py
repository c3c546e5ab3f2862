"""The package imports without side effects and reports what was built."""

import json
import subprocess
import sys

import hessgap
from hessgap import _extension
from hessgap.info import build_info


def test_build_info_reports_the_extension():
    info = build_info()
    assert info["hessgap"] == hessgap.__version__
    assert info["extension_loaded"], info.get("extension_error")
    assert info["cpu_kernels"]
    assert "box_ascent_step" in info["ops"]


def test_info_module_prints_json():
    out = subprocess.run([sys.executable, "-m", "hessgap.info", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["torch"]


def test_missing_extension_message_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", ImportError("no module named hessgap._C"))
    try:
        _extension.require()
    except RuntimeError as exc:
        assert "pip install --no-build-isolation -e ." in str(exc)
    else:
        raise AssertionError("require() must raise when the extension is missing")


def test_unknown_public_name_is_an_attribute_error():
    try:
        _ = hessgap.not_a_function  # the lookup raises
    except AttributeError as exc:
        assert "not_a_function" in str(exc)
    else:
        raise AssertionError


def test_every_public_name_resolves():
    for name in hessgap.__all__:
        assert getattr(hessgap, name) is not None, name
    assert callable(hessgap.sharpness) and callable(hessgap.eigenvalues)


def test_info_into_a_closed_pipe_exits_quietly():
    """`python -m hessgap.info | head -1`: the reader stops early; no BrokenPipeError traceback."""
    process = subprocess.Popen([sys.executable, "-m", "hessgap.info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before anything was written
    err = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
