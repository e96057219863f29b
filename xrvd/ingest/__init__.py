"""The ways in: a DICOM listener (scp.py), a drop folder (watch.py), an archive crawl
(scan.py). Each only hands instances to the store, which journals them with their verdict."""

from __future__ import annotations

from .. import metrics


def note_skipped(log, outcome) -> None:
    """An instance journaled as not to be classified (store.StoreOutcome.skipped): told once,
    here, where the verdict was made."""
    if outcome.skipped:
        metrics.SKIPPED.labels(outcome.skipped).inc()
        log.info("instance.skipped", sop_instance_uid=outcome.sop_uid,
                 study_instance_uid=outcome.study_uid, reason=outcome.skipped,
                 detail=outcome.skip_detail)
