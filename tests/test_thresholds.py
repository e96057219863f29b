"""Per-finding thresholds (model.thresholds): the config takes findings in any case and refuses
a typo with the nearest name; a back-fill calls each finding at its own threshold in the SR,
the sidecar, the journal and the export, and classify agrees; -t overrides them all."""

from __future__ import annotations

import csv
import json

import pydicom
import pytest

from xrvd.cli import main
from xrvd.config import Config
from xrvd.report.build import FINDING_CODES, read_findings
from xrvd.thresholds import Thresholds

from .harness import (
    MODEL,
    NIH_SC,
    WG04_CR,
    copy_with_new_uids,
    journal_rows,
    sidecar,
    write_config,
)

OWN = {"cardiomegaly": 0.0, "Effusion": 0.99}  # Cardiomegaly always present


def test_a_finding_is_called_at_its_own_threshold_and_the_rest_at_the_default():
    thresholds = Thresholds.make(0.5, {"Cardiomegaly": 0.3, "Fracture": 0.9},
                                 ["Cardiomegaly", "Effusion"])
    assert thresholds.per_finding == (("Cardiomegaly", 0.3),)  # Fracture: not this model's
    assert thresholds.positive("Cardiomegaly", 0.3) and not thresholds.positive("Effusion", 0.4)
    assert thresholds.describe() == "0.5; Cardiomegaly 0.3"
    again = Thresholds.recorded(0.5, json.loads(thresholds.overrides_json()))
    assert again == thresholds
    assert Thresholds.recorded(0.5, {}) == Thresholds(0.5) == Thresholds.coerce(0.5)


def test_the_config_takes_findings_in_any_case_and_refuses_a_typo():
    model = Config.model_validate({"model": {"thresholds": {"cardiomegaly": 0.62}}}).model
    assert model.thresholds == {"Cardiomegaly": 0.62}
    assert Thresholds.unused(model, ["Pneumonia"]) == ["Cardiomegaly"]
    with pytest.raises(ValueError, match="did you mean 'Cardiomegaly'"):
        Config.model_validate({"model": {"thresholds": {"Cardiomegally": 0.6}}})
    with pytest.raises(ValueError, match="must be between 0 and 1"):
        Config.model_validate({"model": {"thresholds": {"Effusion": 1.5}}})


def test_backfill_sr_sidecar_journal_export_and_classify_use_them(
        tmp_path, ready_weights, allow_untrained, capsys):
    archive = tmp_path / "archive"
    copy_with_new_uids(WG04_CR, archive / "one.dcm")
    copy_with_new_uids(NIH_SC, archive / "two.dcm")
    config = write_config(tmp_path, ready_weights(MODEL), model={"thresholds": OWN},
                          output={"folder": str(tmp_path / "out")})
    assert main(["backfill", "-c", str(config), "--workers", "0", str(archive)]) == 0
    expected = Thresholds(0.5, (("Cardiomegaly", 0.0), ("Effusion", 0.99)))

    reports = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(reports) == 2
    for report in reports:
        document = sidecar(report)
        assert document["thresholds"] == {"Cardiomegaly": 0.0, "Effusion": 0.99}
        [image] = document["images"]
        for finding in image["findings"]:
            assert finding["threshold"] == expected.of(finding["label"])
            assert finding["positive"] == (finding["score"] >= finding["threshold"])
        calls = read_findings(pydicom.dcmread(report))[image["sop_instance_uid"]]
        assert calls[FINDING_CODES["Cardiomegaly"][2]][1] is True
        for label, score in ((f["label"], f["score"]) for f in image["findings"]):
            assert calls[FINDING_CODES[label][2]][1] == expected.positive(label, score)

    recorded = journal_rows(tmp_path / "state", "SELECT threshold, thresholds FROM runs")
    assert {(t, json.loads(o)["Effusion"]) for t, o in recorded} == {(0.5, 0.99)}

    # Export says what the run was called at, even once the config has changed.
    (tmp_path / "changed").mkdir()
    changed = write_config(tmp_path / "changed", ready_weights(MODEL), model={"threshold": 0.7},
                           state_dir=str(tmp_path / "state"))
    exported = tmp_path / "results.csv"
    assert main(["export", "-c", str(changed), str(exported)]) == 0
    with open(exported, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:
        assert float(row["threshold"]) == 0.5
        assert json.loads(row["thresholds"]) == {"Cardiomegaly": 0.0, "Effusion": 0.99}
        assert row["positive_Cardiomegaly"] == "True"
        assert row["positive_Effusion"] == str(float(row["score_Effusion"]) >= 0.99)
        assert row["positive_Pneumonia"] == str(float(row["score_Pneumonia"]) >= 0.5)
    capsys.readouterr()

    assert main(["classify", "-c", str(config), "--format", "json", str(WG04_CR)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["threshold"] == 0.5
    assert document["thresholds"] == {"Cardiomegaly": 0.0, "Effusion": 0.99}
    findings = {f["label"]: f for f in document["results"][0]["findings"]}
    assert findings["Cardiomegaly"]["positive"] and findings["Cardiomegaly"]["threshold"] == 0.0
    table_run = main(["classify", "-c", str(config), str(WG04_CR)])
    assert table_run == 0 and "threshold 0.5; Cardiomegaly 0, Effusion 0.99" in \
        capsys.readouterr().out
    # -t: one threshold for every finding, the config's per-finding ones included
    assert main(["classify", "-c", str(config), "-t", "0.5", "--format", "json",
                 str(WG04_CR)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["thresholds"] == {}
    assert all(f["threshold"] == 0.5 for f in document["results"][0]["findings"])
