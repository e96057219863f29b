"""Spool retention (storage.keep_spool): received files are deleted once their study is done
with them, so that a PACS forwarding everything cannot fill the disk over weeks.

A study is done with its files when it is classified (or failed, if failed studies are not
kept) and none of its reports still waits to be delivered. Before a file goes, its content
hash is recorded, so that the same instance sent again is still recognised as a duplicate
(no second report). Files of an archive read in place are never deleted. A study that gets a
late image after its files went is classified again on the images still held: its new report
names the earlier one as its predecessor.
"""

from __future__ import annotations

import os
import time

from .records import content_digest

# A batch per call, so that the caller (the daemon's supervision loop) is never held long.
PURGE_BATCH = 200


class RetentionMixin:
    def purge_spool(self, keep: str, keep_days: float | None = None,
                    limit: int = PURGE_BATCH) -> tuple[int, int]:
        """Delete up to `limit` spool files that the retention setting no longer keeps:
        keep 'none' or 'failed', or 'days N' (keep_days). Returns (files, bytes) deleted."""
        now = time.time()
        states = ("classified",) if keep == "failed" else ("classified", "failed")
        finished_before = now - keep_days * 86400 if keep_days is not None else now
        with self._lock:
            rows = self._db.execute(
                f"SELECT i.id, i.path, i.size, i.content_sha256 FROM instances i "
                f"JOIN studies s ON s.id = i.study_id "
                f"WHERE i.purged_at IS NULL AND i.path NOT LIKE '/%' "
                f"AND s.state IN ({', '.join('?' for _ in states)}) AND s.updated_at <= ? "
                f"AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN runs r ON r.id = d.run_id "
                f"WHERE r.study_id = s.id AND d.state {_UNDELIVERED[keep]}) "
                f"LIMIT ?", (*states, finished_before, limit)).fetchall()
        files = freed = 0
        for instance_id, relative, size, digest in rows:
            path = self.spool / relative
            if digest is None:  # recorded first: a resend must still be a duplicate
                try:
                    digest = content_digest(path)
                except OSError:
                    digest = ""
                with self._transaction() as db:
                    db.execute("UPDATE instances SET content_sha256 = ? WHERE id = ? AND "
                               "content_sha256 IS NULL", (digest or None, instance_id))
            try:
                os.unlink(path)
                freed += size
                files += 1
            except FileNotFoundError:
                pass
            with self._transaction() as db:
                db.execute("UPDATE instances SET purged_at = ? WHERE id = ?",
                           (now, instance_id))
        return files, freed

    def spool_usage(self) -> tuple[int, int]:
        """(files, bytes) of received instances the spool holds now (from the journal)."""
        with self._lock:
            count, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances "
                "WHERE purged_at IS NULL AND path NOT LIKE '/%'").fetchone()
        return count, size


# Which deliveries keep a study's files: those still pending; with keep 'failed', failed
# ones too (their study is kept for a person to look at).
_UNDELIVERED = {
    "none": "= 'pending'",
    "failed": "IN ('pending', 'failed')",
    "days": "= 'pending'",
}
