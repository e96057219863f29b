"""The Structured Report built with highdicom (report/build.py): valid (dciodvfy), read back
into the same findings, the same instance for the same run and a rerun naming its predecessor,
a code for every label, untrained weights named; result file names never come from unsafe UIDs
(report/files.py)."""

from __future__ import annotations

import dataclasses

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from xrvd.report.build import (
    FINDING_CODES,
    PRIVATE_SCHEME,
    build_report,
    read_findings,
    report_uid,
)
from xrvd.report.files import safe_name
from xrvd.report.template import comparable
from xrvd.thresholds import Thresholds

from ..harness import MODEL, NIH_SC, RSNA_JPEG, WG04_CR, dciodvfy_errors, scores_for
from ..harness import report_identity as identity

SOURCES = [WG04_CR, NIH_SC, RSNA_JPEG]


@pytest.mark.parametrize("flavour", ["comprehensive3d", "enhanced"])
@pytest.mark.parametrize("model", ["densenet121-res224-all", "densenet121-res224-rsna",
                                   "jfhealthcare-densenet121-res512"])
def test_report_is_valid_and_reads_back(model, flavour, tmp_path):
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in SOURCES]
    # one study: the report covers images of the same study
    for ds in sources[1:]:
        ds.StudyInstanceUID = sources[0].StudyInstanceUID
    scores = scores_for(sources, model)
    sr = build_report(sources, scores, identity(model), 0.5, flavour=flavour)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)

    back = pydicom.dcmread(path)
    expected_class = ("1.2.840.10008.5.1.4.1.1.88.34" if flavour == "comprehensive3d"
                      else "1.2.840.10008.5.1.4.1.1.88.22")
    assert back.SOPClassUID == expected_class
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.PatientID == sources[0].PatientID
    assert back.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in sources}
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    assert "AI RESULT" in back.SeriesDescription
    evidence = {item.ReferencedSOPInstanceUID
                for study in back.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert evidence == {str(ds.SOPInstanceUID) for ds in sources}

    findings = read_findings(back)
    assert set(findings) == set(scores)
    for uid, labels in scores.items():
        expected = {FINDING_CODES[label][2]: (score, score >= 0.5)
                    for label, score in labels.items()}
        assert set(findings[uid]) == set(expected)
        for meaning, (score, present) in expected.items():
            assert findings[uid][meaning][0] == pytest.approx(score, abs=1e-6)
            assert findings[uid][meaning][1] == present
    private = any(FINDING_CODES[label][1] == PRIVATE_SCHEME
                  for labels in scores.values() for label in labels)
    declared = [item.CodingSchemeDesignator
                for item in back.get("CodingSchemeIdentificationSequence", [])]
    assert (PRIVATE_SCHEME in declared) == private
    assert dciodvfy_errors(path) == []  # last: skipped where dicom3tools is not installed


def test_same_run_gives_the_same_instance_and_a_rerun_names_its_predecessor(tmp_path):
    sources = [pydicom.dcmread(NIH_SC, stop_before_pixels=True)]
    model = "densenet121-res224-nih"
    first = build_report(sources, scores_for(sources, model), identity(model), 0.5)
    again = build_report(sources, scores_for(sources, model), identity(model), 0.5)
    assert first.SOPInstanceUID == again.SOPInstanceUID == report_uid(
        str(sources[0].StudyInstanceUID), model, "ab" * 32, 0)
    rerun = build_report(sources, scores_for(sources, model, seed=1), identity(model), 0.5,
                         generation=1, predecessor=first)
    assert rerun.SOPInstanceUID != first.SOPInstanceUID
    [study] = rerun.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    # This source has an invalid Patient's Age ("81"): the report drops it and stays valid.
    assert "PatientAge" not in rerun
    rerun.save_as(tmp_path / "rerun.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "rerun.dcm") == []


def test_every_label_of_every_model_has_a_code():
    from xrvd.pipeline.registry import MODELS

    for spec in MODELS.values():
        for label in spec.label_names:
            assert label in FINDING_CODES


def test_untrained_weights_are_named_in_the_report():
    sources = [pydicom.dcmread(NIH_SC, stop_before_pixels=True)]
    model = "densenet121-res224-rsna"
    untrained = dataclasses.replace(identity(model), untrained=True)
    sr = build_report(sources, scores_for(sources, model), untrained, 0.5)
    assert sr.SeriesDescription.startswith("UNTRAINED TEST")


def test_result_names_never_come_from_unsafe_uids():
    assert safe_name("1.2.840.10008.1") == "1.2.840.10008.1"
    for hostile in ("../../etc/passwd", "1.2/3", "", "1." * 40):
        name = safe_name(hostile)
        assert "/" not in name and ".." not in name and name.startswith("x")


def test_a_finding_with_a_threshold_of_its_own_is_called_at_it():
    """model.thresholds: Present/Absent per finding at its own threshold, the rest at the
    default, and every threshold named in the algorithm's parameters."""
    sources = [pydicom.dcmread(NIH_SC, stop_before_pixels=True)]
    uid = str(sources[0].SOPInstanceUID)
    scores = {uid: {"Cardiomegaly": 0.4, "Effusion": 0.6, "Pneumonia": 0.45}}
    thresholds = Thresholds(0.5, (("Cardiomegaly", 0.3), ("Effusion", 0.7)))
    sr = build_report(sources, scores, identity(MODEL), thresholds)
    calls = {meaning: present for meaning, (_, present) in read_findings(sr)[uid].items()}
    assert calls == {FINDING_CODES["Cardiomegaly"][2]: True,
                     FINDING_CODES["Effusion"][2]: False,
                     FINDING_CODES["Pneumonia"][2]: False}
    assert {"threshold=0.5", "threshold Cardiomegaly=0.3",
            "threshold Effusion=0.7"} <= _texts(sr)


def _texts(dataset) -> set[str]:
    """Every TEXT content item's value, at any depth of the content tree."""
    found = set()
    for item in dataset.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            found.add(str(item.TextValue))
        found |= _texts(item)
    return found


@pytest.mark.parametrize("flavour", ["comprehensive3d", "enhanced"])
def test_a_heatmap_is_cited_in_its_findings_group_and_the_evidence(flavour, tmp_path):
    sources = [pydicom.dcmread(NIH_SC, stop_before_pixels=True)]
    uid = str(sources[0].SOPInstanceUID)
    scores = {uid: {"Cardiomegaly": 0.7, "Effusion": 0.6, "Pneumonia": 0.1}}
    heatmaps = {}
    for label in ("Cardiomegaly", "Effusion"):
        header = Dataset()
        header.SOPClassUID = SecondaryCaptureImageStorage
        header.SOPInstanceUID = generate_uid()
        header.SeriesInstanceUID = "1.2.3.4"
        header.StudyInstanceUID = sources[0].StudyInstanceUID
        heatmaps[(uid, label)] = header
    fast = build_report(sources, scores, identity(MODEL), 0.5, heatmaps=heatmaps,
                        flavour=flavour)
    slow = build_report(sources, scores, identity(MODEL), 0.5, heatmaps=heatmaps,
                        flavour=flavour, templates=False)
    assert comparable(fast) == comparable(slow)
    assert read_findings(fast) == read_findings(slow)
    cited = {}
    for group in fast.ContentSequence[-1].ContentSequence:
        finding = next(item.ConceptCodeSequence[0].CodeMeaning for item in group.ContentSequence
                       if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0]
                       .CodeValue == "121071")  # Finding
        for item in group.ContentSequence:
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == \
                    "121080":  # Best illustration of finding
                cited[finding] = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert cited == {FINDING_CODES[label][2]: str(header.SOPInstanceUID)
                     for (_, label), header in heatmaps.items()}
    evidence = {item.ReferencedSOPInstanceUID
                for study in fast.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert evidence == {uid, *(str(h.SOPInstanceUID) for h in heatmaps.values())}
    fast.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
