"""`xrvd status`: the journal read-only, while the daemon may be running."""

from __future__ import annotations

import time
from pathlib import Path

from ..fsutil import free_bytes
from .records import StoreError, journal_path, open_read_only


def read_status(state_dir: Path) -> dict:
    """What `xrvd status` shows, read-only, while the daemon may be running."""
    db = open_read_only(state_dir)
    if db is None:
        raise StoreError(f"no journal at {journal_path(state_dir)}: has xrvd serve run with "
                         "this state_dir?")
    try:
        studies = dict(db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state"))
        instances = dict(db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state"))
        skipped = dict(db.execute("SELECT reason, COUNT(*) FROM instances "
                                  "WHERE state = 'skipped' GROUP BY reason"))
        oldest = db.execute("SELECT study_uid, MIN(last_instance_at) FROM studies "
                            "WHERE state IN ('receiving', 'processing')").fetchone()
        failures = [
            {"study_instance_uid": uid, "attempts": attempts, "reason": reason,
             "since": updated}
            for uid, attempts, reason, updated in db.execute(
                "SELECT study_uid, attempts, reason, updated_at FROM studies "
                "WHERE state = 'failed' ORDER BY updated_at DESC LIMIT 20")]
        deliveries = {
            name: {"sent": sent or 0, "pending": pending or 0, "failed": failed or 0,
                   "last_error": error}
            for name, sent, pending, failed, error in db.execute(
                "SELECT destination, SUM(state = 'sent'), SUM(state = 'pending'), "
                "SUM(state = 'failed'), (SELECT last_error FROM deliveries e WHERE "
                "e.destination = d.destination AND e.last_error IS NOT NULL ORDER BY "
                "e.updated_at DESC LIMIT 1) FROM deliveries d GROUP BY destination")}
        columns = {row[1] for row in db.execute("PRAGMA table_info(instances)")}
        unpurged = "purged_at IS NULL AND " if "purged_at" in columns else ""
        spool_files, spool_bytes = db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances WHERE {unpurged}"
            "path NOT LIKE '/%'").fetchone()
        last_run = db.execute("SELECT model, weights_sha256, finished_at FROM runs "
                              "WHERE state = 'done' ORDER BY finished_at DESC LIMIT 1").fetchone()
        sources = _sources(db)
    finally:
        db.close()
    now = time.time()
    try:
        free = free_bytes(state_dir)
    except OSError:
        free = None
    return {
        "spool": {"files": spool_files, "bytes": spool_bytes, "free_bytes": free},
        "studies": studies,
        "instances": instances,
        "skipped_by_reason": skipped,
        "queue_depth": studies.get("receiving", 0) + studies.get("processing", 0),
        "oldest_waiting": None if oldest[0] is None else {
            "study_instance_uid": oldest[0], "waiting_s": round(now - oldest[1], 1)},
        "failed_studies": failures,
        "deliveries": deliveries,
        "last_run": None if last_run is None else {
            "model": last_run[0], "weights_sha256": last_run[1],
            "finished_ago_s": round(now - last_run[2], 1)},
        "sources": sources,
    }


def _sources(db) -> dict[str, dict]:
    """Each PACS back-fill's position: the days queried (first, last, how many) and its
    studies by state."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "source_days" not in tables:  # a journal from before PACS back-fills
        return {}
    found: dict[str, dict] = {}
    for source, first, last, count in db.execute(
            "SELECT source, MIN(day), MAX(day), COUNT(*) FROM source_days GROUP BY source"):
        found[source] = {"days_queried": count, "first_day": first, "last_day": last,
                         "studies": {}, "instances_retrieved": 0}
    for source, state, count, instances in db.execute(
            "SELECT source, state, COUNT(*), COALESCE(SUM(instances), 0) FROM source_studies "
            "GROUP BY source, state"):
        entry = found.setdefault(source, {"days_queried": 0, "first_day": None,
                                          "last_day": None, "studies": {},
                                          "instances_retrieved": 0})
        entry["studies"][state] = count
        entry["instances_retrieved"] += instances
    return found


def earlier_outcomes(state_dir: Path, source: str, study_uids: list[str], model: str,
                     weights_sha256: str | None) -> dict[str, str]:
    """For `backfill --source --dry-run`: why a run would not retrieve each of these studies,
    as far as the journal knows (empty where there is no journal yet). A study is reported
    before when this model (with these weights, when known) reported it."""
    db = open_read_only(state_dir)
    if db is None:
        return {}
    outcomes: dict[str, str] = {}
    try:
        tables = {row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        weights = "" if weights_sha256 is None else " AND runs.weights_sha256 = ?"
        for start in range(0, len(study_uids), 500):  # SQLite's bound on parameters
            chunk = study_uids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for uid, in db.execute(
                    "SELECT DISTINCT studies.study_uid FROM runs JOIN studies ON studies.id = "
                    f"runs.study_id WHERE studies.study_uid IN ({marks}) AND runs.model = ? "
                    f"AND runs.state = 'done'{weights}",
                    (*chunk, model, *([weights_sha256] if weights_sha256 else []))):
                outcomes[uid] = f"reported before by {model}"
            if "source_studies" not in tables:
                continue
            for uid, state, reason in db.execute(
                    "SELECT study_uid, state, reason FROM source_studies WHERE source = ? AND "
                    f"study_uid IN ({marks}) AND state != 'found'", (source, *chunk)):
                outcomes.setdefault(uid, {
                    "retrieved": "retrieved by an earlier run",
                    "failed": f"failed in an earlier run ({(reason or '')[:120]})",
                }.get(state, f"not retrieved by an earlier run ({reason})"))
    finally:
        db.close()
    return outcomes
