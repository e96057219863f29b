"""The checked fast path of the Structured Report (report/template.py): document and groups
filled in from templates give, element for element, the document highdicom builds."""

from __future__ import annotations

import dataclasses

import pydicom
import pytest

from xrvd.report import build as report
from xrvd.report.build import build_report, read_findings
from xrvd.report.template import comparable
from xrvd.thresholds import Thresholds

from ..harness import NIH_SC, RSNA_JPEG, WG04_CR, scores_for
from ..harness import report_identity as identity

SOURCES = [WG04_CR, NIH_SC, RSNA_JPEG]


@pytest.mark.parametrize("flavour", ["comprehensive3d", "enhanced"])
@pytest.mark.parametrize("model", ["densenet121-res224-all", "jfhealthcare-densenet121-res512"])
@pytest.mark.parametrize("images", [1, 3])
def test_templates_give_the_report_highdicom_builds(model, flavour, images):
    """The fast path (document and groups filled in from templates) against building all of
    it with highdicom: element for element the same document, for untrained weights too, for
    other thresholds (one per finding too) and Present/Absent both ways."""
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in SOURCES[:images]]
    for ds in sources[1:]:
        ds.StudyInstanceUID = sources[0].StudyInstanceUID
    scores = scores_for(sources, model, seed=images)
    per_finding = Thresholds(0.5, (("Cardiomegaly", 0.2), ("Effusion", 0.9)))
    for untrained, threshold in ((False, Thresholds(0.5)), (True, Thresholds(0.3)),
                                 (False, per_finding)):
        who = dataclasses.replace(identity(model), untrained=untrained)
        fast = build_report(sources, scores, who, threshold, flavour=flavour, generation=2)
        slow = build_report(sources, scores, who, threshold, flavour=flavour, generation=2,
                            templates=False)
        assert report._document_template(report._Settings(  # the template passed its check
            who, threshold, flavour, 9901, fast.SeriesDescription)) is not None
        assert comparable(fast) == comparable(slow)
        assert read_findings(fast) == read_findings(slow)  # also in memory, not written
