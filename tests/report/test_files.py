"""The report as a file: found again in the output folder with its scores, and read back for
sending in each destination's flavour, equal to what pydicom reads from the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage
from pynetdicom.dsutils import encode

from xrvd.pipeline.models import ModelIdentity
from xrvd.pipeline.registry import get_spec
from xrvd.report.build import FINDING_CODES, build_report, label_for_meaning
from xrvd.report.files import (
    EncodedReport,
    EncodedReports,
    HeatmapJob,
    OutputSettings,
    ReportJob,
    UnreadableReport,
    as_flavour,
    find_existing_report,
    heatmap_files,
    safe_name,
    write_report,
)
from xrvd.thresholds import Thresholds

from ..harness import NIH_SC, WG04_CR, require_tool

MODEL = "densenet121-res224-all"
WEIGHTS = "ab" * 32


def identity(model: str = MODEL, weights_sha256: str = WEIGHTS) -> ModelIdentity:
    spec = get_spec(model)
    return ModelIdentity(spec.name, spec.architecture, spec.weights_file, weights_sha256,
                         "1.5.7", False)


@pytest.fixture(scope="module")
def study() -> list[pydicom.Dataset]:
    """Two images of one study (headers)."""
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in (WG04_CR, NIH_SC)]
    sources[1].StudyInstanceUID = sources[0].StudyInstanceUID
    return sources


def random_scores(sources, seed: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    return {str(ds.SOPInstanceUID): {label: float(rng.uniform())
                                     for label in get_spec(MODEL).label_names}
            for ds in sources}


def write(folder, sources, scores, generation: int, who: ModelIdentity | None = None,
          flavour: str = "comprehensive3d", thresholds: Thresholds = Thresholds(0.5),
          sidecar: bool = False):
    written = write_report(ReportJob(
        study_uid=str(sources[0].StudyInstanceUID), generation=generation,
        sources=list(sources), scores=scores, identity=who or identity(), thresholds=thresholds,
        output=OutputSettings(folder, flavour, 9901, "AI RESULT (xrvd) - test", sidecar)))
    assert written.error is None, written.error
    return written.path


def dciodvfy_errors(path) -> list[str]:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]


def test_the_sidecar_gives_each_finding_the_threshold_it_was_called_at(study, tmp_path):
    scores = {uid: {label: 0.4 for label in labels}
              for uid, labels in random_scores(study, seed=3).items()}
    path = write(tmp_path, study, scores, 0, thresholds=Thresholds(0.5, (("Cardiomegaly", 0.3),)),
                 sidecar=True)
    sidecar = json.loads(Path(path).with_suffix(".json").read_text())
    assert sidecar["threshold"] == 0.5 and sidecar["thresholds"] == {"Cardiomegaly": 0.3}
    for image in sidecar["images"]:
        calls = {f["label"]: (f["threshold"], f["positive"]) for f in image["findings"]}
        assert calls.pop("Cardiomegaly") == (0.3, True)
        assert set(calls.values()) == {(0.5, False)}


def test_a_heatmap_that_cannot_be_made_leaves_the_report_and_the_others(study, tmp_path):
    """One finding's source cannot be read: its heatmap is named in heatmap_errors, the
    report is written citing the heatmap that could be made, and a rerun of the same run
    leaves no stale key image in the report's folder."""
    scores = random_scores(study, seed=4)
    cr, sc = (str(ds.SOPInstanceUID) for ds in study)
    made = HeatmapJob(cr, str(WG04_CR), "Cardiomegaly", scores[cr]["Cardiomegaly"],
                      np.arange(49, dtype=np.float32).reshape(7, 7))
    broken = HeatmapJob(sc, str(tmp_path / "gone.dcm"), "Effusion", scores[sc]["Effusion"],
                        np.zeros((7, 7), dtype=np.float32))

    def run(*heatmaps):
        written = write_report(ReportJob(
            study_uid=str(study[0].StudyInstanceUID), generation=0, sources=list(study),
            scores=scores, identity=identity(), thresholds=Thresholds(0.5),
            output=OutputSettings(tmp_path, "comprehensive3d", 9901, "AI RESULT", True),
            heatmaps=heatmaps))
        assert written.error is None, written.error
        return written

    written = run(made, broken)
    assert written.heatmaps == 1
    [(uid, label, error)] = written.heatmap_errors
    assert (uid, label) == (sc, "Effusion") and "gone.dcm" in error
    [path] = heatmap_files(written.path)
    heatmap = pydicom.dcmread(path)
    sidecar = json.loads(Path(written.path).with_suffix(".json").read_text())
    cited = {f["label"]: f.get("heatmap_sop_instance_uid")
             for image in sidecar["images"] if image["sop_instance_uid"] == cr
             for f in image["findings"]}
    assert cited["Cardiomegaly"] == heatmap.SOPInstanceUID and cited["Effusion"] is None
    assert run().heatmaps == 0 and heatmap_files(written.path) == []


def test_a_heatmap_is_drawn_from_a_file_read_as_classification_reads_it(study, tmp_path):
    """A file with no preamble and no file meta is classified (read with the project's own
    reader): its heatmap is drawn too, not dropped."""
    bare = tmp_path / "bare.dcm"
    ds = pydicom.dcmread(NIH_SC)
    ds.preamble = None
    del ds.file_meta
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert not bare.read_bytes()[128:132] == b"DICM"
    scores = random_scores(study, seed=5)
    sc = str(study[1].SOPInstanceUID)
    written = write_report(ReportJob(
        study_uid=str(study[0].StudyInstanceUID), generation=0, sources=list(study),
        scores=scores, identity=identity(), thresholds=Thresholds(0.5),
        output=OutputSettings(tmp_path, "comprehensive3d", 9901, "AI RESULT", False),
        heatmaps=(HeatmapJob(sc, str(bare), "Effusion", scores[sc]["Effusion"],
                             np.arange(49, dtype=np.float32).reshape(7, 7)),)))
    assert written.error is None and written.heatmap_errors == ()
    assert written.heatmaps == 1 and len(heatmap_files(written.path)) == 1


# --- finding an earlier report -----------------------------------------------------------


def test_the_latest_generation_is_found_with_the_scores_it_holds(study, tmp_path):
    written = {generation: random_scores(study, seed=generation) for generation in (0, 2, 10)}
    paths = {generation: write(tmp_path, study, scores, generation)
             for generation, scores in written.items()}

    existing = find_existing_report(tmp_path, str(study[0].StudyInstanceUID), identity())

    assert str(existing.path) == paths[10]  # by number: generation 10 comes after 2
    assert set(existing.scores) == set(written[10])
    for uid, labels in written[10].items():
        assert set(existing.scores[uid]) == set(labels)  # the registry's label names
        for label, score in labels.items():  # the report holds % to 4 decimals
            assert existing.scores[uid][label] == pytest.approx(score, abs=1e-6)


def test_no_report_for_an_empty_folder_another_model_or_other_weights(study, tmp_path):
    study_uid = str(study[0].StudyInstanceUID)
    assert find_existing_report(tmp_path / "none", study_uid, identity()) is None
    (tmp_path / safe_name(study_uid)).mkdir()
    assert find_existing_report(tmp_path, study_uid, identity()) is None

    write(tmp_path, study, random_scores(study, seed=0), 0)
    assert find_existing_report(tmp_path, study_uid, identity()) is not None
    other_model = identity("densenet121-res224-nih")
    assert find_existing_report(tmp_path, study_uid, other_model) is None
    assert find_existing_report(tmp_path, study_uid, identity(weights_sha256="cd" * 32)) is None
    assert find_existing_report(tmp_path, "1.2.3.4", identity()) is None


@pytest.mark.parametrize("content", ["garbage", "an image"])
def test_an_unreadable_latest_report_is_signalled(study, tmp_path, content):
    """Only the latest generation counts: an older readable one does not stand in for it."""
    older = write(tmp_path, study, random_scores(study, seed=0), 0)
    latest = Path(older).with_name(Path(older).name.replace("-g0.dcm", "-g1.dcm"))
    if content == "garbage":
        latest.write_bytes(b"not DICOM at all")
    else:
        shutil.copy(NIH_SC, latest)  # DICOM, but no measurement report

    with pytest.raises(UnreadableReport) as raised:
        find_existing_report(tmp_path, str(study[0].StudyInstanceUID), identity())
    assert raised.value.path == latest and raised.value.error


def test_every_finding_meaning_gives_its_label_back():
    for label, (_, _, meaning) in FINDING_CODES.items():
        assert label_for_meaning(meaning) == label
    assert label_for_meaning("Something else") == "Something else"


# --- reading back for sending -------------------------------------------------------------


@pytest.fixture(scope="module")
def report_files(study, tmp_path_factory) -> dict[str, str]:
    """Report files as xrvd writes them (templates) and as highdicom alone writes them."""
    folder = tmp_path_factory.mktemp("reports")
    scores = random_scores(study, seed=3)
    slow = folder / "slow.dcm"
    build_report(study, scores, identity(), 0.5, templates=False).save_as(
        slow, enforce_file_format=True)
    return {"written": write(folder, study, scores, 0), "highdicom": str(slow)}


@pytest.mark.parametrize("flavour", ["comprehensive3d", "enhanced"])
@pytest.mark.parametrize("made_by", ["written", "highdicom"])
def test_a_report_read_for_sending_equals_the_file_read_by_pydicom(report_files, made_by,
                                                                   flavour, tmp_path):
    path = report_files[made_by]
    expected = as_flavour(pydicom.dcmread(path), flavour)
    encoded = EncodedReport(path)

    sent = encoded.dataset(flavour)
    assert sent == expected
    assert sent.file_meta == expected.file_meta
    for implicit in (False, True):  # as pynetdicom encodes it for the transfer syntax agreed
        assert encode(encoded.dataset(flavour), implicit, True) == \
            encode(expected, implicit, True)

    out = tmp_path / "sent.dcm"
    encoded.dataset(flavour).save_as(out, enforce_file_format=True)
    assert dciodvfy_errors(out) == []


def test_the_enhanced_flavour_is_a_stable_instance_of_its_own(report_files):
    path = report_files["written"]
    original = pydicom.dcmread(path)
    encoded = EncodedReport(path)

    enhanced = encoded.dataset("enhanced")
    assert enhanced.SOPClassUID == enhanced.file_meta.MediaStorageSOPClassUID == \
        EnhancedSRStorage
    assert enhanced.SOPInstanceUID == enhanced.file_meta.MediaStorageSOPInstanceUID
    assert enhanced.SOPInstanceUID != original.SOPInstanceUID
    assert EncodedReport(path).dataset("enhanced").SOPInstanceUID == enhanced.SOPInstanceUID
    # each send has a dataset of its own: flavouring one leaves the next as the file is
    again = encoded.dataset("comprehensive3d")
    assert again.SOPClassUID == again.file_meta.MediaStorageSOPClassUID == \
        Comprehensive3DSRStorage
    assert again.SOPInstanceUID == original.SOPInstanceUID
    # an Enhanced SR on file stays as it is for either flavour
    as_enhanced = as_flavour(pydicom.dcmread(path), "enhanced")
    assert as_flavour(as_enhanced, "comprehensive3d") == as_enhanced
    assert as_flavour(as_enhanced, "enhanced") == as_enhanced


def test_each_file_is_read_once_and_anew_when_replaced(study, tmp_path):
    path = write(tmp_path, study, random_scores(study, seed=0), 0)
    reports = EncodedReports()
    results: list[EncodedReport] = []
    start = threading.Barrier(4)

    def destination():
        start.wait()
        results.append(reports.get(path))

    threads = [threading.Thread(target=destination) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4 and all(result is results[0] for result in results)

    rerun = write(tmp_path, study, random_scores(study, seed=1), 0)  # same name, new content
    assert rerun == path
    fresh = reports.get(path)
    assert fresh is not results[0]
    assert fresh.dataset("comprehensive3d") == pydicom.dcmread(path)


def test_reports_beyond_the_size_bound_are_dropped_oldest_first(study, tmp_path):
    paths = [write(tmp_path / str(n), study, random_scores(study, seed=n), 0) for n in range(3)]
    reports = EncodedReports(max_bytes=1)  # keeps only the latest
    first = reports.get(paths[0])
    assert reports.get(paths[0]) is first
    reports.get(paths[1])
    assert reports.get(paths[0]) is not first


def test_a_broken_file_is_an_error_each_time(tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM")
    reports = EncodedReports()
    for _ in range(2):
        with pytest.raises(InvalidDicomError):  # not remembered as read
            reports.get(broken)
