"""Reports waiting to be sent to each destination, and `xrvd retry`."""

from __future__ import annotations

import time


class DeliveriesMixin:
    def due_deliveries(self, destination: str,
                       limit: int = 10) -> list[tuple[int, str, int, float]]:
        """(delivery id, report path, attempts, created_at) due now for one destination."""
        with self._lock:
            return self._db.execute(
                "SELECT d.id, r.result_path, d.attempts, d.created_at FROM deliveries d "
                "JOIN runs r ON r.id = d.run_id WHERE d.destination = ? AND "
                "d.state = 'pending' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at "
                "LIMIT ?", (destination, time.time(), limit)).fetchall()

    def deliveries_pending(self) -> int:
        """Reports still to be sent to some destination (being retried included)."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()[0]

    def next_delivery_in(self, destination: str) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM deliveries WHERE destination = ? AND "
                "state = 'pending'", (destination,)).fetchone()
        return None if row[0] is None else max(0.0, row[0] - time.time())

    def delivery_done(self, delivery_id: int, state: str, error: str | None = None,
                      retry_in: float | None = None) -> None:
        """state 'sent' or 'failed'; or 'pending' again with retry_in seconds."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, "
                       "last_error = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                       (state, error, now + (retry_in or 0), now, delivery_id))
            self._transition(db, "delivery", delivery_id, state, error)

    def retry_failed(self) -> int:
        """Failed studies go back into the queue with fresh attempts, and failed deliveries
        are sent again (`xrvd retry`)."""
        now = time.time()
        with self._transaction() as db:
            ids = [row[0] for row in db.execute("SELECT id FROM studies WHERE state = 'failed'")]
            db.execute("UPDATE studies SET state = 'receiving', attempts = 0, not_before = 0, "
                       "updated_at = ? WHERE state = 'failed'", (now,))
            for study_id in ids:
                self._transition(db, "study", study_id, "receiving", "retry")
            sends = db.execute("UPDATE deliveries SET state = 'pending', attempts = 0, "
                               "next_attempt_at = ?, created_at = ?, updated_at = ? "
                               "WHERE state = 'failed'", (now, now, now)).rowcount
        return len(ids) + sends
