"""Query and retrieve from a PACS (ingest/retrieve.py) against a real Orthanc: windows split at
its result cap, only the wanted series retrieved, failures typed for the back-off; and the
pacing of retrievals."""

from __future__ import annotations

import datetime as dt

import pytest

from xrvd.config import validate_config
from xrvd.ingest.incoming import Incoming
from xrvd.ingest.dimse import DimseClient
from xrvd.ingest.retrieve import Pacer, RetrieveError
from xrvd.store import Store

from ..harness import free_port, journal_rows


def client_for(pacs, store=None, **settings) -> DimseClient:
    source = validate_config({"sources": [pacs.source(**settings)]}).source("pacs")
    incoming = Incoming(store.incoming, 64 << 20) if store is not None else None
    return DimseClient(source, store, incoming)


def test_a_busy_day_is_split_until_each_reply_is_under_the_cap(pacs):
    archive = pacs.archive
    client = client_for(pacs)
    busy = client.find_studies(archive.busy_day)
    on_busy_day = {uid for uid, day in archive.studies.items() if day == archive.busy_day}
    chest = archive.chest_studies & on_busy_day
    assert len(chest) > pacs.cap
    found = {s.study_uid for s in busy.studies}
    # Orthanc matches ModalitiesInStudy: the CT and MR studies of the day are not listed.
    assert chest <= found <= on_busy_day
    assert busy.windows > 1 and busy.capped_windows == 0
    quiet_day = next(day for day in archive.days if day != archive.busy_day)
    quiet = client.find_studies(quiet_day)
    assert quiet.windows == 1
    assert {s.study_uid for s in quiet.studies} == {
        uid for uid in archive.chest_studies if archive.studies[uid] == quiet_day}


def test_xrvds_requests_go_out_without_nagles_delay_and_stock_sockets_are_untouched(pacs):
    """A request is a command PDU and a data set PDU: with Nagle's algorithm the second waits
    for the PACS's delayed ACK. TCP_NODELAY is set on xrvd's own sockets only."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    def nodelay(assoc) -> int:
        return assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    with client_for(pacs)._association([(Verification, None)]) as assoc:
        assert nodelay(assoc)
    stock = AE(ae_title="XRVD")
    stock.add_requested_context(Verification)
    assoc = stock.associate("127.0.0.1", pacs.orthanc.dicom_port, ae_title="ORTHANC")
    try:
        assert assoc.is_established and not nodelay(assoc)
    finally:
        assoc.release()


def test_only_the_wanted_series_are_retrieved_by_c_get(pacs, tmp_path):
    archive = pacs.archive
    store = Store(tmp_path / "state")
    try:
        client = client_for(pacs, store)
        # Each study with a chest image, CT beside it or a lateral series: their CR/DX
        # series only (the lateral is a CR too: selection skips it later, with its reason).
        retrieved = 0
        for study_uid in sorted(archive.chest_studies):
            series = client.find_series(study_uid)
            assert series and {s.modality for s in series} <= {"CR", "DX"}
            result = client.retrieve(study_uid, series)
            assert result.failed == 0 and result.instances == sum(s.instances for s in series)
            retrieved += result.instances
    finally:
        store.close()
    rows = journal_rows(tmp_path / "state", "SELECT sop_uid, source, state, reason FROM instances")
    sops = {sop for sop, *_ in rows}
    assert len(rows) == len(sops) == retrieved
    assert archive.frontal_sops <= sops
    assert not sops & archive.non_chest_sops  # no CT, no MR
    assert {source for _, source, *_ in rows} == {"retrieve:pacs"}
    skipped = {sop: reason for sop, _, state, reason in rows if state == "skipped"}
    assert set(skipped) == archive.lateral_sops and set(skipped.values()) == {"lateral_view"}
    assert store.open_studies() == set()  # every retrieval let its study settle


def test_a_study_of_other_modalities_has_no_series_to_retrieve(pacs):
    archive = pacs.archive
    other = sorted(set(archive.studies) - archive.chest_studies)
    assert other
    client = client_for(pacs)
    assert all(client.find_series(uid) == [] for uid in other)
    # The same study is a CT study for a source that asks for CT.
    ct = client_for(pacs, modalities=["CT", "MR"])
    assert any(ct.find_series(uid) for uid in other)


def test_a_source_that_is_down_is_an_error_worth_retrying(pacs, tmp_path):
    closed = client_for(pacs, port=free_port(), timeout_seconds=5)
    with pytest.raises(RetrieveError) as error:
        closed.find_studies(pacs.archive.busy_day)
    assert error.value.reason == "unreachable" and error.value.retry


def test_a_move_the_pacs_cannot_carry_out_is_an_error_with_its_status(pacs, tmp_path):
    """Orthanc answers a C-MOVE to an AE it does not know with 0xC000 (unable to process),
    not the standard's 0xA801: a status worth a retry, counted against the study."""
    store = Store(tmp_path / "state")
    try:
        client = client_for(pacs, store, retrieve="move", move_destination="NOBODY")
        study_uid = sorted(pacs.archive.chest_studies)[0]
        with pytest.raises(RetrieveError) as error:
            client.retrieve(study_uid, client.find_series(study_uid))
        assert store.open_studies() == set()
    finally:
        store.close()
    assert (error.value.reason, error.value.retry) == ("status", True), str(error.value)
    assert "0xC000" in str(error.value)


class FakeClock:
    def __init__(self):
        self.monotonic = 1000.0
        self.wall = dt.datetime(2024, 1, 2, 12, 0, 0)

    def now(self) -> dt.datetime:
        return self.wall + dt.timedelta(seconds=self.monotonic - 1000.0)


class Never:
    """A stop event that is never set; waiting on it moves the fake clock instead."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.waited: list[float] = []

    def is_set(self) -> bool:
        return False

    def wait(self, seconds: float) -> bool:
        self.waited.append(seconds)
        self.clock.monotonic += seconds
        return False


def pacer(**settings):
    source = validate_config({"sources": [{"name": "pacs", "ae_title": "P", "host": "h",
                                           "port": 104, **settings}]}).source("pacs")
    clock = FakeClock()
    return Pacer(source, clock=lambda: clock.monotonic, now=clock.now), clock, Never(clock)


def test_retrievals_are_spaced_to_the_hourly_rate():
    paced, clock, stop = pacer(max_studies_per_hour=120)
    starts = []
    for _ in range(3):
        assert paced.wait(stop, on_pause=lambda s: None)
        starts.append(clock.monotonic)
    assert [b - a for a, b in zip(starts, starts[1:])] == [30.0, 30.0]


def test_failures_back_off_doubling_up_to_the_limit_and_reset_on_success():
    paced, clock, stop = pacer(retry_seconds=10, max_retry_seconds=25)
    assert [paced.failed() for _ in range(3)] == [10, 20, 25]
    started = clock.monotonic
    assert paced.wait(stop, on_pause=lambda s: None)
    assert clock.monotonic - started == 25
    paced.succeeded()
    assert paced.failed() == 10


def test_outside_its_schedule_a_source_is_left_alone():
    paced, clock, stop = pacer(schedule="13:00-14:00")  # the clock says 12:00
    paused = []
    assert paced.wait(stop, on_pause=paused.append)
    assert clock.now() >= dt.datetime(2024, 1, 2, 13, 0) and paused[0] == 3600


def test_a_pacs_that_ignores_modalities_in_study_is_noticed_once(events):
    from types import SimpleNamespace

    from xrvd.ingest.retrieve import found_study
    from xrvd.log import get_logger

    def client(setting: str):
        source = SimpleNamespace(modalities_in_study=setting, modalities=["CR", "DX"])
        return SimpleNamespace(source=source, modalities_in_study=setting != "no",
                               log=get_logger(component="retrieve"))

    auto = client("auto")
    assert found_study(" 1.2.3 ", ["CR", "CT"], auto).study_uid == "1.2.3"
    assert auto.modalities_in_study  # a wanted modality among them: the key is honoured
    assert found_study("1.2.4", ["ct"], auto).modalities == ("CT",)
    assert not auto.modalities_in_study  # a CT-only study was listed: the key is ignored
    assert found_study("", ["CR"], auto) is None and found_study("9" * 65, [], auto) is None
    assert len([e for e in events if e["event"] == "source.modalities_in_study_ignored"]) == 1
    trusted = client("yes")
    found_study("1.2.5", ["MR"], trusted)
    assert trusted.modalities_in_study  # told to trust the PACS: it does
