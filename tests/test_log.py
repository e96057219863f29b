"""Events are JSON lines, and identifying values are hashed in every one of them (and kept out
of the journal's transitions) unless `log.include_patient_identifiers` is true: the processor
itself and the salt kept in the state directory. The three ways in are checked end to end in
tests/commands/test_serve.py (drop folder, C-STORE) and test_backfill.py."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest
import structlog

from xrvd import log
from xrvd.store.core import transition_source

from .harness import MARKER


@pytest.fixture
def events_to(request):
    """log.configure(...) into a StringIO; returns (stream, parsed events) readers."""
    stream = io.StringIO()

    def configure(**options) -> io.StringIO:
        stream.seek(0)
        stream.truncate()
        log.configure("debug", "json", stream=stream, **options)
        return stream

    yield configure
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- the processor ----------------------------------------------------------------------


def test_identifying_values_hash_the_same_within_a_salt_and_differently_across(events_to):
    path = f"/archive/DOE_{MARKER}_12345/img.dcm"
    stream = events_to(salt=b"a" * 32)
    logger = log.get_logger()
    logger.info("file.skipped", file=path, reason="not_dicom",
                detail=f"cannot read {path}: no permission")
    logger.info("instance.stored", PatientName=f"DOE^{MARKER}", patient_id=f"{MARKER}1",
                accession_number=f"A{MARKER}", file=path)
    first, second = lines(stream)
    assert MARKER not in stream.getvalue()
    assert first["file"] == second["file"] == log.pseudonym(path, b"a" * 32)
    assert first["file"].startswith("id:") and len(first["file"]) == len("id:") + 16
    assert first["detail"] == f"cannot read {first['file']}: no permission"
    assert first["reason"] == "not_dicom"  # reason codes are not identifiers

    stream = events_to(salt=b"b" * 32)
    log.get_logger().info("file.skipped", file=path)
    assert lines(stream)[0]["file"] != first["file"]

    stream = events_to(salt=b"b" * 32, include_patient_identifiers=True)
    log.get_logger().info("file.skipped", file=path, detail=f"cannot read {path}")
    assert lines(stream)[0] == {**lines(stream)[0], "file": path,
                                "detail": f"cannot read {path}"}


def test_nested_values_and_private_folders_are_covered(events_to, tmp_path):
    drop = tmp_path / "drop"
    stream = events_to(salt=b"s" * 32)
    log.private_folder(drop)
    log.get_logger().info(
        "daemon.unhealthy", folder=str(drop),
        problems=[f"cannot move {drop}/DOE_{MARKER}/x.dcm: disk full",
                  {"file": f"{MARKER}.dcm", "nested": {"patient_name": MARKER}}],
        study={"accession_number": [f"A{MARKER}", f"B{MARKER}"]},
        error=f"FileNotFoundError(2, 'No such file or directory', '{drop}/{MARKER} 1.dcm')")
    [event] = lines(stream)
    assert MARKER not in stream.getvalue()
    assert event["folder"] == str(drop)  # the configured folder itself is not private
    assert event["problems"][0].startswith("cannot move id:") and \
        event["problems"][0].endswith(": disk full")
    assert event["problems"][1]["file"].startswith("id:")
    assert event["study"]["accession_number"][0] != event["study"]["accession_number"][1]
    assert event["error"].startswith("FileNotFoundError(2, 'No such file or directory', 'id:")


def test_free_text_for_events_and_the_journal(events_to):
    path = f"/archive/DOE_{MARKER}/x.dcm"
    events_to(salt=b"t" * 32)
    text = log.redact_text(f"{path} is gone (No such file or directory)", Path(path))
    assert text == f"{log.pseudonym(path, b't' * 32)} is gone (No such file or directory)"
    missing = FileNotFoundError(2, "No such file or directory", path)
    assert log.error_text(missing) == "FileNotFoundError: No such file or directory"
    assert log.error_text(ValueError("bad")) == "ValueError: bad"
    events_to(salt=b"t" * 32, include_patient_identifiers=True)
    assert log.redact_text(f"{path} is gone", path) == f"{path} is gone"

    assert transition_source(f"watch:DOE_{MARKER}/x.dcm") == "watch"
    assert transition_source("backfill") == "backfill"
    assert transition_source("scp:MODALITY@10.0.0.7") == "scp:MODALITY@10.0.0.7"
    assert transition_source(path) == "other"


def test_the_salt_is_made_once_kept_private_and_never_written_by_readers(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    assert log.load_salt(state, create=False) == log.process_salt()
    assert not (state / log.SALT_FILE).exists()  # a command that only reads writes nothing

    salt = log.load_salt(state)
    assert salt != log.process_salt() and len(salt) >= 16
    assert stat.S_IMODE((state / log.SALT_FILE).stat().st_mode) == 0o600
    assert log.load_salt(state) == salt == log.load_salt(state, create=False)
    assert [p.name for p in state.iterdir()] == [log.SALT_FILE]  # no temporary left

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert log.load_salt(not_a_folder) == log.process_salt()  # cannot write: process salt


def test_events_are_json_lines_without_patient_identifiers():
    stream = io.StringIO()
    log.configure("info", "json", stream=stream)
    log.get_logger().info("instance.stored", patient_name="DOE^JANE", patient_id="123",
                          sop_instance_uid="1.2.3")
    event = json.loads(stream.getvalue())
    assert event["event"] == "instance.stored"
    assert event["patient_name"] == log.pseudonym("DOE^JANE", log.process_salt())
    assert event["patient_id"] == log.pseudonym("123", log.process_salt())
    assert event["sop_instance_uid"] == "1.2.3"
    structlog.reset_defaults()


def test_patient_identifiers_logged_only_when_config_allows():
    stream = io.StringIO()
    log.configure("info", "json", stream=stream, include_patient_identifiers=True)
    log.get_logger().info("instance.stored", patient_name="DOE^JANE")
    assert json.loads(stream.getvalue())["patient_name"] == "DOE^JANE"
    log.get_logger().debug("hidden")
    assert stream.getvalue().count("\n") == 1  # below the configured level
    structlog.reset_defaults()
