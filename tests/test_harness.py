"""The test harness's PACS: Orthanc holds build_pacs_archive's files, and caps its answers to a
query the way the back-fill's window splitting expects (Orthanc 1.10, LimitFindResults)."""

from __future__ import annotations

import json
import urllib.request

from pydicom.dataset import Dataset

from .harness import Orthanc, build_pacs_archive

CAP = 5
PENDING = (0xFF00, 0xFF01)
# "Matching terminated due to cancel request": what Orthanc ends a capped C-FIND with, after
# the first CAP matches (an uncapped one ends with Success, 0x0000).
CANCEL = 0xFE00


def c_find_studies(orthanc: Orthanc, study_date: str) -> tuple[list[str], int]:
    """The Study Instance UIDs a STUDY-level C-FIND for one StudyDate matches, and the final
    status."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title="XRVDTEST")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title="ORTHANC")
    assert assoc.is_established, "Orthanc refused the association"
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyDate = study_date
    query.StudyInstanceUID = ""
    found, final = [], None
    try:
        for status, identifier in assoc.send_c_find(query, FIND):
            assert status, "no C-FIND response"
            if status.Status in PENDING:
                found.append(str(identifier.StudyInstanceUID))
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return found, final


def qido_studies(orthanc: Orthanc, query: str) -> tuple[list[str], str | None]:
    """The Study Instance UIDs a QIDO-RS study query matches, and the reply's Warning header
    (where a DICOMweb server may say that it left matches out)."""
    request = urllib.request.Request(
        f"{orthanc.dicomweb_url}/studies?{query}",
        headers={"Authorization": orthanc.authorization(), "Accept": "application/dicom+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        studies = json.loads(response.read() or b"[]")
        return [s["0020000D"]["Value"][0] for s in studies], response.headers.get("Warning")


def test_orthanc_holds_the_archive_and_caps_queries(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.configure(dicomweb=True, find_cap=CAP)
    archive = build_pacs_archive(tmp_path / "archive")
    orthanc.start()
    try:
        for path in archive.files:
            orthanc.upload(path)
        assert orthanc.instances_count() == len(archive.files)

        busy = archive.busy_day.strftime("%Y%m%d")
        on_busy_day = {uid for uid, day in archive.studies.items() if day == archive.busy_day}
        assert len(on_busy_day & archive.chest_studies) > CAP

        # C-FIND stops at the cap and says so: CAP matches, then Cancel instead of Success.
        found, final = c_find_studies(orthanc, busy)
        assert len(found) == CAP and set(found) <= on_busy_day
        assert final == CANCEL, f"final C-FIND status {final!r}"
        # A day under the cap is answered in full, with Success.
        quiet = archive.days[0]
        found, final = c_find_studies(orthanc, quiet.strftime("%Y%m%d"))
        assert set(found) == {uid for uid, day in archive.studies.items() if day == quiet}
        assert final == 0x0000

        # QIDO-RS is capped silently (200, no Warning header) and one past the cap: Orthanc
        # fetches CAP + 1 matches to tell that the cap was hit, and only its C-FIND handler
        # drops the extra one. A client cannot page past it (offset) either.
        studies, warning = qido_studies(orthanc, f"StudyDate={busy}")
        assert len(studies) == CAP + 1 and set(studies) <= on_busy_day and warning is None
        rest, _ = qido_studies(orthanc, f"StudyDate={busy}&offset={CAP}&limit={CAP}")
        assert rest == studies[CAP:]
    finally:
        orthanc.stop()
