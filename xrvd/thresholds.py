"""Operating points: one default threshold and, where a site has chosen them (`xrvd evaluate
--write-thresholds`), one per finding. A finding is positive when its score is at or above its
threshold; the SR's Present/Absent, `xrvd classify`, export and metrics all ask this one
object, and the journal records it with each run, so a result always says the threshold it was
called at.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    default: float = 0.5
    per_finding: tuple[tuple[str, float], ...] = ()  # sorted by name: equal values compare equal

    @classmethod
    def of_config(cls, model_config, labels: Sequence[str]) -> Thresholds:
        """`model.threshold` and, for the findings among `labels`, `model.thresholds` (whose
        names config.py has already put in the models' spelling)."""
        return cls.make(model_config.threshold, model_config.thresholds, labels)

    @classmethod
    def make(cls, default: float, overrides: Mapping[str, float],
             labels: Sequence[str]) -> Thresholds:
        return cls(float(default), tuple(sorted((name, float(value))
                                                for name, value in overrides.items()
                                                if name in labels)))

    @staticmethod
    def unused(model_config, labels: Sequence[str]) -> list[str]:
        """Findings given a threshold that this model does not report (worth a warning)."""
        return sorted(name for name in model_config.thresholds if name not in labels)

    @classmethod
    def coerce(cls, value: Thresholds | float) -> Thresholds:
        """A plain number: one threshold for every finding."""
        return value if isinstance(value, Thresholds) else cls(float(value))

    @property
    def overrides(self) -> dict[str, float]:
        return dict(self.per_finding)

    def of(self, label: str) -> float:
        for name, value in self.per_finding:
            if name == label:
                return value
        return self.default

    def positive(self, label: str, score: float) -> bool:
        return bool(score >= self.of(label))

    def describe(self) -> str:
        """`0.5`, or `0.5; Cardiomegaly 0.62, Effusion 0.4`, for tables."""
        if not self.per_finding:
            return f"{self.default:g}"
        return f"{self.default:g}; " + ", ".join(f"{k} {v:g}" for k, v in self.per_finding)

    def overrides_json(self) -> str | None:
        """The journal's `runs.thresholds` (None: every finding at the default)."""
        return json.dumps(self.overrides, sort_keys=True) if self.per_finding else None

    @classmethod
    def recorded(cls, default: float, overrides: Mapping[str, float]) -> Thresholds:
        """What a run recorded (its `runs.threshold` and `runs.thresholds`), taken as it is."""
        return cls.make(default, overrides, list(overrides))
