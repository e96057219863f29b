"""Progress of a long job (`xrvd backfill`): a bar on a terminal, periodic `*.progress` events
otherwise (journald, CI logs), and a summary table at the end."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO

from ..log import get_logger


class Progress:
    def __init__(self, interactive: bool, *, event: str = "backfill.progress",
                 interval_s: float = 10.0):
        self.interactive = interactive
        self.event = event
        self.interval_s = interval_s
        self.counts: Counter[str] = Counter()
        self.phase = "starting"
        self.total: int | None = None
        self.done = 0
        self.phase_started = time.monotonic()
        self._last_event = 0.0
        self._bar = None
        self.log = get_logger(component="backfill")

    def start_phase(self, phase: str, total: int | None = None) -> None:
        self.phase, self.total, self.done = phase, total, 0
        self.phase_started = time.monotonic()
        if self.interactive:
            from tqdm import tqdm

            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, desc=phase, unit="file" if total is None else "img",
                             dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
        self._emit(force=True)

    def advance(self, done: int = 0, **counts: int) -> None:
        self.done += done
        self.counts.update({key: value for key, value in counts.items() if value})
        if self._bar is not None:
            self._bar.update(done)
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._emit()

    def elapsed(self) -> float:
        """Seconds since the current phase started (never 0)."""
        return max(time.monotonic() - self.phase_started, 1e-9)

    def rate(self) -> float:
        return self.done / self.elapsed()

    def eta_s(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def _postfix(self) -> str:
        keys = ("found", "classified", "skipped", "failed")
        return " ".join(f"{key}={self.counts[key]}" for key in keys if self.counts[key])

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.interactive or (not force and now - self._last_event < self.interval_s):
            return
        self._last_event = now
        eta = self.eta_s()
        self.log.info(self.event, phase=self.phase, done=self.done, total=self.total,
                      rate_per_s=round(self.rate(), 2),
                      eta_s=None if eta is None else round(eta, 1),
                      **{key: value for key, value in sorted(self.counts.items())
                         if ":" not in key})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def print_table(rows: list[tuple[str, str]], out: TextIO, title: str) -> None:
    width = max(len(label) for label, _ in rows)
    out.write(f"{title}\n")
    for label, value in rows:
        out.write(f"  {label:<{width}}  {value}\n")
    out.flush()
