"""`xrvd backfill --source` end to end against a real PACS (Orthanc on loopback, holding
studies over several days, more on one day than its result cap, with laterals, CT and MR):
every frontal chest image classified once, nothing else retrieved, every report stored back
in the PACS once, by C-GET and by C-MOVE; a kill -9 midway and a rerun retrieve nothing twice;
a PACS that goes down is retried, then reported, and the next run goes on."""

from __future__ import annotations

from collections import Counter

from xrvd.cli import main

from ..harness import MODEL, PASSWORD, USER, DaemonProcess, journal_rows, write_config

SINCE, UNTIL = "2024-01-01", "2024-01-06"


def backfill_config(tmp_path, pacs, ready_weights, **source):
    return write_config(
        tmp_path, ready_weights(MODEL),
        scp={"port": pacs.xrvd_port, "allowed_calling_aets": ["ORTHANC"]},
        sources=[pacs.source(**source)],
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                       "port": pacs.orthanc.dicom_port}],
        delivery={"retry_seconds": 0.2, "max_retry_seconds": 1})


def backfill(config, tmp_path, *extra) -> DaemonProcess:
    return DaemonProcess(config, tmp_path / "state",
                         ("backfill", "--source", "pacs", "--since", SINCE, "--until", UNTIL,
                          "--workers", "0", *extra), ready=None).start()


def check_archive_annotated(pacs, state_dir):
    archive = pacs.archive
    rows = journal_rows(state_dir, "SELECT sop_uid, state, reason FROM instances")
    received = Counter(sop for sop, *_ in rows)
    assert set(received) >= archive.frontal_sops
    assert max(received.values()) == 1  # nothing retrieved twice
    assert not set(received) & archive.non_chest_sops  # no CT, no MR
    classified = {sop for sop, state, _ in rows if state == "classified"}
    assert classified == archive.frontal_sops
    runs = journal_rows(state_dir, "SELECT s.study_uid, COUNT(*) FROM runs r JOIN studies s "
                        "ON s.id = r.study_id WHERE r.state = 'done' GROUP BY s.study_uid")
    assert dict(runs) == {uid: 1 for uid in archive.chest_studies}
    for study_uid in archive.chest_studies:
        reports = pacs.orthanc.reports_in_study(study_uid)
        assert len(reports) == 1, f"study {study_uid}: {reports}"
    studies = dict(journal_rows(state_dir, "SELECT study_uid, state FROM source_studies"))
    assert {uid for uid, state in studies.items() if state == "retrieved"} == \
        archive.chest_studies


def test_backfill_by_c_get_annotates_the_pacs(tmp_path, pacs, ready_weights, capsys):
    config = backfill_config(tmp_path, pacs, ready_weights)
    # A dry run lists what would be retrieved and what not, and journals nothing.
    assert main(["backfill", "-c", str(config), "--source", "pacs", "--since", SINCE,
                 "--until", UNTIL, "--dry-run"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()
              if line.startswith(("retrieve ", "skip "))]
    assert {uid for action, _, uid, *_ in listed if action == "retrieve"} == \
        pacs.archive.chest_studies
    assert not (tmp_path / "state" / "journal.sqlite3").exists()

    run = backfill(config, tmp_path)
    assert run.wait(timeout=300) == 0, run.stderr[-3000:]
    check_archive_annotated(pacs, tmp_path / "state")
    assert run.find("source.window_split", day=pacs.archive.busy_day.isoformat())
    assert "studies retrieved" in run.stderr and "C-GET" in run.stderr
    assert main(["status", "-c", str(config)]) == 0
    status = capsys.readouterr().out
    assert f"{len(pacs.archive.chest_studies)} retrieved" in status and "source:    pacs" in status

    # Now a dry run reads the journal: nothing would be retrieved, and it says why.
    assert main(["backfill", "-c", str(config), "--source", "pacs", "--since", SINCE,
                 "--until", UNTIL, "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines()
              if line.startswith(("retrieve ", "skip "))]
    assert not [line for line in listed if line.startswith("retrieve ")]
    assert {line.split()[2] for line in listed if f"reported before by {MODEL}" in line} == \
        pacs.archive.chest_studies

    # Everything is done: a second run asks the PACS for no study again.
    again = backfill(config, tmp_path)
    assert again.wait(timeout=300) == 0, again.stderr[-3000:]
    assert not again.find("study.retrieved") and not again.find("source.queried")
    [finished] = again.find("backfill.finished")
    assert finished["days_queried_before"] == 6


def test_backfill_by_c_move_annotates_the_pacs(tmp_path, pacs, ready_weights):
    config = backfill_config(tmp_path, pacs, ready_weights, retrieve="move")
    run = backfill(config, tmp_path)
    assert run.wait(timeout=300) == 0, run.stderr[-3000:]
    check_archive_annotated(pacs, tmp_path / "state")
    assert run.find("association.accepted", calling_aet="ORTHANC")


def test_a_kill_midway_and_a_rerun_retrieve_nothing_twice(tmp_path, pacs, ready_weights):
    config = backfill_config(tmp_path, pacs, ready_weights)
    first = backfill(config, tmp_path)
    try:
        first.wait_for("study.retrieved", count=3, timeout=240)
        first.kill()
    finally:
        first.stop()
    retrieved_before = {e["study_instance_uid"] for e in first.find("study.retrieved")}
    second = backfill(config, tmp_path)
    assert second.wait(timeout=300) == 0, second.stderr[-3000:]
    retrieved_after = {e["study_instance_uid"] for e in second.find("study.retrieved")}
    assert not retrieved_before & retrieved_after
    check_archive_annotated(pacs, tmp_path / "state")


def test_a_pacs_that_goes_down_is_retried_then_reported(tmp_path, pacs, ready_weights):
    config = backfill_config(tmp_path, pacs, ready_weights, max_attempts=3)
    run = backfill(config, tmp_path)
    try:
        run.wait_for("study.retrieved", timeout=240)
        pacs.orthanc.stop()
        assert run.wait(timeout=300) == 1, run.stderr[-3000:]  # partial: go on later
    finally:
        run.stop()
    failures = run.find("source.failed")
    assert [f["attempt"] for f in failures][-3:] == [1, 2, 3]
    [unavailable] = run.find("source.unavailable")
    assert "3 attempts in a row" in unavailable["detail"]
    assert "run the same command again" in run.stderr

    pacs.orthanc.start()
    rerun = backfill(config, tmp_path)
    assert rerun.wait(timeout=300) == 0, rerun.stderr[-3000:]
    check_archive_annotated(pacs, tmp_path / "state")


def test_backfill_by_dicomweb_annotates_the_pacs_and_stows_the_reports(
        tmp_path, dicomweb_pacs, ready_weights):
    pacs = dicomweb_pacs
    config = write_config(
        tmp_path, ready_weights(MODEL), sources=[pacs.web_source()],
        destinations=[{"name": "orthanc-web", "type": "dicomweb",
                       "url": pacs.orthanc.dicomweb_url,
                       "auth": {"type": "basic", "username": USER, "password": PASSWORD}}],
        delivery={"retry_seconds": 0.2, "max_retry_seconds": 1})
    run = backfill(config, tmp_path)
    assert run.wait(timeout=300) == 0, run.stderr[-3000:]
    check_archive_annotated(pacs, tmp_path / "state")
    assert run.find("source.window_split", day=pacs.archive.busy_day.isoformat())
    assert len(run.find("report.sent", destination="orthanc-web")) == \
        len(pacs.archive.chest_studies)
    assert "DICOMweb" in run.stderr


def test_a_study_the_pacs_sends_badly_fails_alone(store, tmp_path, events):
    """A reply xrvd cannot use (an exception of any kind while listing or retrieving) or a
    retrieval whose sub-operations failed is that study's failure, retried up to
    max_attempts: the run neither crashes nor takes the study as retrieved."""
    import datetime as dt
    from types import SimpleNamespace

    from xrvd.commands.backfill_source import SourceBackfill, SourceRequest
    from xrvd.commands.progress import Progress
    from xrvd.config import validate_config
    from xrvd.ingest.retrieve import FoundSeries, Pacer, Retrieved

    config = validate_config({"state_dir": str(tmp_path / "state"), "sources": [{
        "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
        "max_attempts": 2, "retry_seconds": 0.01, "max_retry_seconds": 0.01}]})
    backfill = SourceBackfill(config, SourceRequest("pacs", dt.date(2024, 1, 1),
                                                    dt.date(2024, 1, 1)))
    store.record_source_day("pacs", "20240101", "CR,DX", ["1.2.3", "1.2.4"], 1)

    class Broken:
        def find_series(self, study_uid):
            if study_uid == "1.2.3":
                raise ValueError("invalid literal for int() with base 10: 'abc'")
            return [FoundSeries("1.2.4.1", "CR", 1)]

        def retrieve(self, study_uid, series):
            return Retrieved(instances=0, bytes=0, failed=1)

    identity = SimpleNamespace(name="m", weights_sha256="w")
    for _ in range(2):
        for uid in ("1.2.3", "1.2.4"):
            backfill._retrieve_one(Broken(), store, Pacer(backfill.source), uid, identity,
                                   Progress(False))
    states = dict(journal_rows(tmp_path / "state", "SELECT study_uid, state FROM "
                               "source_studies"))
    assert states == {"1.2.3": "failed", "1.2.4": "failed"}
    assert backfill.counts["failed"] == 2 and not backfill.counts["retrieved"]
    failures = [e for e in events if e["event"] == "study.retrieve_failed"]
    assert {e["reason"] for e in failures} == {"unexpected", "incomplete"}
