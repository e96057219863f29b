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

from .errors import ConfigError


@dataclass(frozen=True)
class Thresholds:
    default: float = 0.5
    per_finding: tuple[tuple[str, float], ...] = ()  # sorted by name: equal values compare equal

    @classmethod
    def of_config(cls, model_config, labels: Sequence[str], *,
                  source: str = "configuration") -> Thresholds:
        """`model.threshold` and `model.thresholds` for a model reporting `labels`. A finding
        is matched to the model's name for it without regard to case; one the model does not
        report is a configuration error (a typo would otherwise leave that finding at the
        default without a word)."""
        return cls.make(model_config.threshold, model_config.thresholds, labels, source=source)

    @classmethod
    def make(cls, default: float, overrides: Mapping[str, float], labels: Sequence[str], *,
             source: str = "configuration") -> Thresholds:
        by_name = {label.lower(): label for label in labels}
        chosen: dict[str, float] = {}
        problems = []
        for key, value in overrides.items():
            name = by_name.get(str(key).strip().lower())
            if name is None:
                problems.append(f"model.thresholds.{key}: the model does not report {key!r}; "
                                f"its findings are: {', '.join(labels)}")
            else:
                chosen[name] = float(value)
        if problems:
            raise ConfigError(source, problems)
        return cls(float(default), tuple(sorted(chosen.items())))

    @property
    def overrides(self) -> dict[str, float]:
        return dict(self.per_finding)

    def of(self, label: str) -> float:
        return self.overrides.get(label, self.default)

    def positive(self, label: str, score: float) -> bool:
        return bool(score >= self.of(label))

    def describe(self) -> str:
        """`0.5`, or `0.5; Cardiomegaly 0.62, Effusion 0.4`: for tables and the SR's algorithm
        parameters."""
        if not self.per_finding:
            return f"{self.default:g}"
        return f"{self.default:g}; " + ", ".join(f"{k} {v:g}" for k, v in self.per_finding)

    def overrides_json(self) -> str | None:
        """The journal's `runs.thresholds` (None: every finding at the default)."""
        return json.dumps(self.overrides, sort_keys=True) if self.per_finding else None

    @classmethod
    def from_journal(cls, default: float, overrides_json: str | None) -> Thresholds:
        overrides = json.loads(overrides_json) if overrides_json else {}
        return cls(float(default), tuple(sorted((str(k), float(v))
                                                for k, v in overrides.items())))
