"""The record of installed weights (pipeline/trust.py): weights changed after import are refused
everywhere until imported again; weights without a record are trusted on first use, loudly,
and refused once they change; an unreadable record refuses to start."""

import json

import pytest
import torch
from structlog.testing import capture_logs

from xrvd.cli import main
from xrvd.config import load_config
from xrvd.errors import TrustRecordError, WeightsChangedError
from xrvd.pipeline import trust
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import get_spec

from ..harness import NIH_SC, strip_marker, torch_config

DENSENET = "densenet121-res224-nih"


def test_weights_changed_after_import_are_refused_until_imported_again(untrained_weights,
                                                                       tmp_path, capsys):
    spec = get_spec(DENSENET)
    carried = strip_marker(DENSENET, untrained_weights(DENSENET), tmp_path / "usb")
    config = torch_config(tmp_path)
    assert main(["models", "import", DENSENET, str(carried), "-c", str(config)]) == 0
    installed = tmp_path / "state" / "models" / spec.weights_file
    record = json.loads((tmp_path / "state" / trust.TRUST_FILE).read_text())
    assert record["files"][str(installed)]["sha256"] == trust.sha256(carried)
    assert record["files"][str(installed)]["source"] == "import"
    assert not Classifier.from_config(load_config(config)).identity.untrained

    # The same architecture with other numbers, written over the installed file.
    network = torch.load(installed, weights_only=False)
    with torch.no_grad():
        network.classifier.bias += 1.0
    torch.save(network, installed)
    with pytest.raises(WeightsChangedError, match=f"xrvd models import {DENSENET}") as info:
        Classifier.from_config(load_config(config))
    assert info.value.reason == "weights_changed"
    assert main(["classify", str(NIH_SC), "-c", str(config)]) == 2
    assert "re-import it" in capsys.readouterr().err
    assert main(["models", "export", DENSENET, "-c", str(config)]) == 2
    assert "re-import it" in capsys.readouterr().err
    assert main(["models", "list", "--verify", "-c", str(config)]) == 0
    listing = capsys.readouterr().out
    assert "changed" in next(row for row in listing.splitlines() if row.startswith(DENSENET))

    assert main(["models", "import", DENSENET, str(installed), "-c", str(config)]) == 0
    changed = Classifier.from_config(load_config(config))
    assert changed.identity.weights_sha256 == trust.sha256(installed)


def test_weights_without_a_record_are_trusted_on_first_use(weights_copy, allow_untrained,
                                                           tmp_path):
    folder = weights_copy(DENSENET)
    path = folder / get_spec(DENSENET).weights_file
    config = torch_config(tmp_path, folder)
    with capture_logs() as logs:
        Classifier.from_config(load_config(config))
    [recorded] = [e for e in logs if e["event"] == "weights.recorded"]
    assert recorded["log_level"] == "warning" and recorded["source"] == "first use"
    assert recorded["sha256"] == trust.sha256(path)
    assert trust.TrustedHashes(tmp_path / "state").entry(path)["sha256"] == recorded["sha256"]
    with capture_logs() as logs:
        Classifier.from_config(load_config(config))
    assert [e for e in logs if e["event"] == "weights.recorded"] == []

    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(WeightsChangedError):
        Classifier.from_config(load_config(config))


def test_an_unreadable_record_refuses_to_start(weights_copy, allow_untrained, tmp_path):
    folder = weights_copy(DENSENET)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / trust.TRUST_FILE).write_text("{ not json")
    with pytest.raises(TrustRecordError, match="delete it"):
        Classifier.from_config(load_config(torch_config(tmp_path, folder)))
