"""Selection (pipeline/select.py): from one parsed header, classify or skip with a reason code,
and the rules that are configurable."""

from __future__ import annotations

import pydicom
import pytest

from xrvd.pipeline.select import SelectRules, select

from ..harness import NIH_SC, REJECT, RSNA_JPEG, TINY_CR, WG04_CR


@pytest.mark.parametrize("path, changes, reason", [
    (WG04_CR, {}, None),
    (NIH_SC, {}, None),  # Secondary Capture, Modality DX, no body part or view
    (RSNA_JPEG, {}, None),
    (WG04_CR, {"ViewPosition": "LL"}, "lateral_view"),
    (WG04_CR, {"BodyPartExamined": "HAND"}, "body_part"),
    (TINY_CR, {}, "too_small"),
    (REJECT / "CT_small.dcm", {}, "modality"),
    (REJECT / "highdicom_sr_document.dcm", {}, "not_an_image"),
    (REJECT / "SC_rgb.dcm", {"Modality": "DX"}, "not_greyscale"),
    (NIH_SC, {"NumberOfFrames": 3}, "multi_frame"),
    (WG04_CR, {"Manufacturer": "xrvd"}, "own_output"),
])
def test_selection(path, changes, reason):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    choice = select(ds)
    assert choice.reason == reason
    assert choice.classify == (reason is None)


def test_selection_rules_are_configurable():
    ds = pydicom.dcmread(NIH_SC, stop_before_pixels=True)
    assert select(ds, SelectRules(classify_missing_view=False)).reason == "view_missing"
    assert select(ds, SelectRules(classify_missing_body_part=False)).reason == \
        "body_part_missing"
