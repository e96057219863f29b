"""The command line: `python -m xrvd`, and `xrvd check-config` printing the effective
configuration or every problem in it (each command's own tests are in tests/commands/)."""

import subprocess
import sys

import yaml

from xrvd import __version__
from xrvd.cli import main


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "xrvd", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"xrvd {__version__}"


def write(tmp_path, text: str):
    path = tmp_path / "xrvd.yaml"
    path.write_text(text)
    return path


def test_check_config_prints_errors_and_fails(tmp_path, capsys):
    path = write(tmp_path, "model:\n  threshold: 1.7\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.threshold: must be between 0 and 1, got 1.7" in err
    assert str(path) in err


def test_check_config_prints_effective_config(tmp_path, capsys):
    path = write(tmp_path, f"state_dir: {tmp_path}\nmodel:\n  threshold: 0.7\n")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    effective = yaml.safe_load(out)
    assert effective["model"]["threshold"] == 0.7
    assert effective["model"]["weights_dir"] == str(tmp_path / "models")
    assert effective["model"]["batch_size"] == 4  # a default, filled in
    assert effective["convert"] == {"voi_lut": False, "modality_lut": False, "fit": "crop"}
    assert out.startswith("# install: full (PyTorch and TorchXRayVision installed")
    assert f"# model densenet121-res224-all: nothing installed in {tmp_path / 'models'}" in out

