"""Crafted and malformed files, as a security probe sends them: each gets a reason code, never a
crash and never a finding, on every way in (store, drop folder, back-fill, `xrvd classify`) and
in the worker's stage (prepare_instance), and the good images beside them are classified."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from xrvd.cli import main
from xrvd.config import WatchConfig
from xrvd.errors import EXIT_OK, EXIT_PARTIAL
from xrvd.ingest.watch import DropFolderWatcher
from xrvd.metrics import REGISTRY
from xrvd.pipeline.convert import ConvertOptions
from xrvd.pipeline.prepare import PrepareJob, prepare_instance
from xrvd.pipeline.select import SelectRules
from xrvd.store import NotStorableError, Store
from xrvd.store.records import read_header

from .conftest import NIH_SC, WG04_CR
from .harness import CRAFTED, copy_with_new_uids, write_config, write_crafted

MODEL = "densenet121-res224-all"
FAST, PYDICOM = ConvertOptions(), ConvertOptions(fit="pad")  # band reader; pydicom decodes


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("crafted")
    for kind in CRAFTED:
        write_crafted(kind, WG04_CR, folder / f"{kind}.dcm")
    return {kind: folder / f"{kind}.dcm" for kind in CRAFTED}


def prepare(path: Path, options: ConvertOptions = FAST, instance_id: int = 1):
    return prepare_instance(PrepareJob(instance_id, str(path)), SelectRules(), options, 224)


def refused(name: str) -> float:
    return REGISTRY.get_sample_value("xrvd_instances_refused_total", {"reason": name}) or 0.0


# --- the header, as the store reads it ---------------------------------------------------


def test_a_header_pydicom_cannot_parse_is_not_storable_as_invalid_header(crafted, tmp_path):
    path = crafted["deep_nesting"]
    with pytest.raises(RecursionError):  # the probe's file: pydicom itself cannot read it
        pydicom.dcmread(path, stop_before_pixels=True, force=True)
    with pytest.raises(NotStorableError) as info:
        read_header(path)
    assert info.value.reason == "invalid_header"
    assert "nested too deeply" in str(info.value) and "dciodvfy" in str(info.value)

    store = Store(tmp_path / "state")
    try:
        with pytest.raises(NotStorableError) as info:
            store.store_file(path, source="test", move=False)
        assert info.value.reason == "invalid_header"
        assert store.query("SELECT COUNT(*) FROM instances") == [(0,)]
    finally:
        store.close()

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    with pytest.raises(NotStorableError) as info:
        read_header(notes)
    assert info.value.reason == NotStorableError.reason == "not_dicom"


# --- the worker's stage: one study, a good image and a crafted one -------------------------


@pytest.mark.parametrize("options", [FAST, PYDICOM], ids=["band_reader", "pydicom_decodes"])
@pytest.mark.parametrize("kind", CRAFTED)
def test_prepare_skips_the_crafted_image_and_converts_the_good_one(crafted, kind, options):
    good = prepare(WG04_CR, options, instance_id=1)
    bad = prepare(crafted[kind], options, instance_id=2)
    assert good.error is None and good.skip_reason is None
    assert good.array is not None and good.array.shape == (1, 1, 224, 224)
    # Skipped on its own: an error= would fail (and retry) the whole study, its good image too.
    assert (bad.skip_reason, bad.error, bad.array is None) == ("invalid_header", None, True)
    assert "corrected copy" in bad.skip_detail


def test_pixel_data_for_two_frames_is_multi_frame_on_either_path(tmp_path):
    """pydicom decodes the pixels of a second frame that the header does not announce, and
    refuses the two frames; the band reader read the first alone, and classified it."""
    path = tmp_path / "two-frames.dcm"
    write_crafted("two_frames_of_pixel_data", WG04_CR, path)
    verdicts = [prepare(path, options) for options in (FAST, PYDICOM)]
    assert [(p.skip_reason, p.error, p.array is None) for p in verdicts] == \
        [("multi_frame", None, True)] * 2


def test_a_value_no_check_covers_fails_only_its_own_image(tmp_path):
    """Past pydicom's checks, a value the arithmetic cannot take (a window of width 0, with
    the VOI LUT option) still fails only its own image, never its study."""
    path = tmp_path / "window-width-0.dcm"
    copy_with_new_uids(WG04_CR, path, WindowWidth=0)
    prepared = prepare(path, ConvertOptions(voi_lut=True))
    assert (prepared.skip_reason, prepared.error) == ("conversion_failed", None)
    assert "Window Width" in prepared.skip_detail and "dciodvfy" in prepared.skip_detail


# --- xrvd classify ----------------------------------------------------------------------


def test_classify_gives_each_crafted_file_its_reason_and_classifies_the_rest(
        crafted, tmp_path, untrained_weights, allow_untrained, capsys):
    missing = tmp_path / "missing.dcm"
    files = [NIH_SC, *(crafted[kind] for kind in CRAFTED), missing, WG04_CR]

    def run(fmt: str) -> tuple[int, str, str]:
        code = main(["classify", *map(str, files), "--format", fmt, "--weights-dir",
                     str(untrained_weights(MODEL))])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = run("json")
    assert code == EXIT_PARTIAL
    assert f"{len(CRAFTED) + 1} of {len(files)} file(s) could not be classified" in err
    results = json.loads(out)["results"]
    assert [r["file"] for r in results] == [str(f) for f in files]
    assert [r.get("error", {}).get("reason") for r in results] == [
        None, *["invalid_header"] * len(CRAFTED), "unreadable", None]
    assert len(results[0]["findings"]) == 18 and len(results[-1]["findings"]) == 18
    assert not any("findings" in r for r in results[1:-1])

    code, out, _ = run("table")
    assert code == EXIT_PARTIAL
    assert out.count("NOT CLASSIFIED (invalid_header)") == len(CRAFTED)
    assert f"{WG04_CR}\n  model {MODEL}" in out


# --- xrvd backfill ----------------------------------------------------------------------


def test_backfill_journals_crafted_files_with_their_reason_and_goes_on(
        tmp_path, untrained_weights, allow_untrained, capsys):
    archive = tmp_path / "archive"
    study = generate_uid()
    good = copy_with_new_uids(WG04_CR, archive / "study" / "good.dcm", study_uid=study)
    paths = {kind: archive / "study" / f"{kind}.dcm" for kind in CRAFTED}
    sops = {kind: write_crafted(kind, WG04_CR, path, study_uid=study).SOPInstanceUID
            for kind, path in paths.items()}
    output = tmp_path / "out"
    config = str(write_config(tmp_path, untrained_weights(MODEL),
                              output={"folder": str(output)}))
    command = ["backfill", "-c", config, "--workers", "0", "--recursive", str(archive)]

    assert main([*command, "--dry-run"]) == EXIT_OK
    verdicts = {line.split()[2]: line.split()[:2] for line in capsys.readouterr().out.splitlines()
                if line.startswith(("classify ", "skip "))}
    assert verdicts[str(archive / "study" / "good.dcm")] == ["classify", "-"]
    assert all(verdicts[str(path)] == ["skip", "invalid_header"] for path in paths.values())

    # Skipped inputs are not failures: as for files that are not DICOM, the run is done.
    assert main(command) == EXIT_OK
    first = _events(capsys.readouterr().out, "backfill.finished")[0]
    assert first["classified"] == 1 and first["skipped"] == {"invalid_header": len(CRAFTED)}
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    try:
        [(outcome, reason)] = db.execute("SELECT outcome, reason FROM archive_files WHERE path "
                                         "= ?", (str(paths["deep_nesting"]),)).fetchall()
        instances = dict(db.execute("SELECT sop_uid, reason FROM instances"))
        scored = [row[0] for row in db.execute(
            "SELECT DISTINCT i.sop_uid FROM scores s JOIN instances i ON i.id = s.instance_id")]
    finally:
        db.close()
    assert outcome == "invalid_header" and reason.startswith("invalid_header: ")
    sops.pop("deep_nesting")  # never journaled as an instance: its header has no UIDs to read
    assert instances == {good.SOPInstanceUID: None,
                         **{sop: "invalid_header" for sop in sops.values()}}
    assert scored == [good.SOPInstanceUID]
    assert len(list(output.rglob("*.dcm"))) == 1  # the study's report, for the good image

    assert main(command) == EXIT_OK  # the rerun passes over every file, the crafted ones too
    again = _events(capsys.readouterr().out, "backfill.finished")[0]
    assert again["seen_before"] == len(CRAFTED) + 1 and again.get("classified", 0) == 0


def _events(stdout: str, name: str) -> list[dict]:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [event for event in events if event.get("event") == name]


# --- the drop folder --------------------------------------------------------------------


def test_drop_folder_rejects_an_unparseable_file_with_its_reason(crafted, tmp_path):
    drop, rejected = tmp_path / "drop", tmp_path / "rejected"
    drop.mkdir()
    for kind, path in crafted.items():
        shutil.copy(path, drop / path.name)
    good = copy_with_new_uids(NIH_SC, drop / "good.dcm")
    store = Store(tmp_path / "state")
    try:
        watcher = DropFolderWatcher(WatchConfig(folder=drop, rejected_folder=rejected,
                                                stable_seconds=3600), store)
        for path in drop.iterdir():
            watcher.mark_closed(path)  # complete: taken by this scan
        before = refused("invalid_header")
        with capture_logs() as events:
            assert watcher.scan() == len(CRAFTED)  # all but the deep nesting
        [event] = [e for e in events if e["event"] == "file.rejected"]
        assert (event["file"], event["reason"]) == ("deep_nesting.dcm", "invalid_header")
        assert refused("invalid_header") == before + 1
        assert not list(drop.iterdir())
        assert (rejected / "deep_nesting.dcm").read_bytes() == \
            crafted["deep_nesting"].read_bytes()
        reason = (rejected / "deep_nesting.dcm.reason.txt").read_text()
        assert reason.startswith("invalid_header: ") and "nested too deeply" in reason

        # The others are valid enough to store: the worker's stage gives each its reason.
        rows = store.query("SELECT id, sop_uid, path FROM instances")
        verdicts = {sop: prepare(store.spool / path, instance_id=n) for n, sop, path in rows}
        assert verdicts.pop(good.SOPInstanceUID).array is not None
        assert [v.skip_reason for v in verdicts.values()] == ["invalid_header"] * 3
    finally:
        store.close()


class _Rescanned(BaseException):
    """Raised by a second scan: escapes the loop, which catches only Exception."""


class _Waited(threading.Event):
    """A stop event whose wait returns at once, as if the time had passed, and stops the loop."""

    def __init__(self):
        super().__init__()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        self.set()
        return True


class _FailingScans(DropFolderWatcher):
    def __init__(self, *args):
        super().__init__(*args)
        self.scans = 0
        self._stop = _Waited()

    def _observer_healthy(self) -> bool:
        return True  # no observer thread: the test runs the loop itself

    def scan(self) -> int:
        self.scans += 1
        if self.scans > 1:
            raise _Rescanned
        self.wake()  # reading a file makes file events, and they wake the watcher
        raise RuntimeError("the scan failed")


def test_a_failed_scan_waits_a_poll_interval_whatever_wakes_it(tmp_path):
    (tmp_path / "drop").mkdir()
    store = Store(tmp_path / "state")
    try:
        watcher = _FailingScans(WatchConfig(folder=tmp_path / "drop", poll_seconds=7), store)
        with capture_logs() as events:
            watcher._run()
        assert watcher.scans == 1
        assert watcher._stop.timeouts == [7]
        assert [e["event"] for e in events] == ["watch.scan_failed"]
    finally:
        store.close()
