"""`xrvd models import`, `list --verify`, `fetch` and `export`: what they print, their exit
status, and what they record in the state directory. What import and fetch check is tested in
tests/pipeline/test_weights.py and test_safeload.py."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from xrvd.cli import main
from xrvd.pipeline import models as models_module
from xrvd.pipeline import onnxrt, trust
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import get_spec

from ..harness import strip_marker

DENSENET = "densenet121-res224-nih"
RESNET = "resnet50-res512-all"
EXPORTED = "densenet121-res224-rsna"  # the quickest to export


def test_import_command(untrained_weights, tmp_path, capsys):
    carried = strip_marker(DENSENET, untrained_weights(DENSENET), tmp_path / "usb")
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    assert main(["models", "import", DENSENET, str(carried), "-c", str(config)]) == 0
    assert "verified and installed" in capsys.readouterr().out
    assert main(["models", "list", "-c", str(config), "--verify"]) == 0
    listing = capsys.readouterr().out
    line = next(row for row in listing.splitlines() if row.startswith(DENSENET))
    assert "ok (" in line
    assert "missing" in next(r for r in listing.splitlines() if r.startswith(RESNET))
    # which models can draw heatmaps, and why the one that cannot does not
    assert "  yes  " in line
    assert "  no  " in next(r for r in listing.splitlines() if r.startswith("jfhealthcare"))
    assert "jfhealthcare-densenet121-res512: its head is not global average pooling" in listing
    assert main(["models", "import", DENSENET, str(tmp_path / "nope.pt"), "-c",
                 str(config)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_fetch_from_a_mirror(mirror, untrained_weights, tmp_path, capsys):
    root, url = mirror
    (root / "v1").mkdir()
    strip_marker(DENSENET, untrained_weights(DENSENET), root / "v1")
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    assert main(["models", "fetch", DENSENET, "--url", url, "-c", str(config)]) == 0
    installed = tmp_path / "state" / "models" / get_spec(DENSENET).weights_file
    assert installed.read_bytes() == (root / "v1" / installed.name).read_bytes()
    entry = trust.TrustedHashes(tmp_path / "state").entry(installed)
    assert entry["sha256"] == trust.sha256(installed) and entry["source"] == "fetch"


def test_models_export_command(weights_copy, allow_untrained, tmp_path, capsys):
    from xrvd.config import load_config

    folder = weights_copy(EXPORTED)
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nmodel:\n  weights_dir: {folder}\n")
    assert main(["models", "export", EXPORTED, "-c", str(config)]) == 0
    out, err = capsys.readouterr()
    installed = folder / f"{EXPORTED}.xrvdmodel"
    assert out.strip() == str(installed)
    assert "verified against PyTorch" in err
    from xrvd.pipeline import package

    manifest = package.read(installed).manifest  # with the maps heatmaps are made from
    assert manifest["maps"] is True
    assert manifest["check"]["maps_max_abs_diff"] <= manifest["check"]["maps_tolerance"]
    path = err.split(" at ")[1].split(";")[0]
    assert path.endswith(".onnx") and os.path.dirname(path) == str(folder)
    record = json.loads(open(path + ".json").read())
    assert record["verified"] is True and record["max_abs_diff"] <= 1e-4
    assert record["weights_sha256"] == hashlib.sha256(
        (folder / get_spec(EXPORTED).weights_file).read_bytes()).hexdigest()
    written = os.stat(path).st_mtime_ns, os.stat(path + ".json").st_mtime_ns
    assert main(["models", "export", EXPORTED, "-c", str(config)]) == 0  # found, not rebuilt
    assert capsys.readouterr().out.strip() == str(installed)
    assert (os.stat(path).st_mtime_ns, os.stat(path + ".json").st_mtime_ns) == written
    assert main(["models", "export", EXPORTED, "--force", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == str(installed)
    assert os.stat(path + ".json").st_mtime_ns != written[1]
    # The daemon's way in finds it too: the command recorded it in the state directory.
    from xrvd.pipeline.weights import TrustedHashes

    assert onnxrt.check_cache(get_spec(EXPORTED), folder, record["weights_sha256"],
                              trusted=TrustedHashes(tmp_path / "state")).status == "verified"
    classifier = Classifier.from_config(load_config(config), name=EXPORTED)
    assert classifier.backend == "onnxruntime"

    empty = tmp_path / "empty.yaml"
    empty.write_text(f"state_dir: {tmp_path / 'other'}\n")
    assert main(["models", "export", EXPORTED, "-c", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and f"xrvd models fetch {EXPORTED}" in err


@pytest.mark.parametrize("command", [["export", EXPORTED], ["import", EXPORTED, "weights.pt"],
                                     ["fetch", EXPORTED]])
def test_weights_commands_say_they_need_the_full_install(command, tmp_path, monkeypatch,
                                                         capsys):
    from xrvd.cli import main

    monkeypatch.setattr(models_module, "torch_installed", lambda: False)
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    assert main(["models", *command, "-c", str(config)]) == 2
    assert f"`xrvd models {command[0]}` needs PyTorch" in capsys.readouterr().err
