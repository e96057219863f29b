"""What the worker has done, as typed events for whoever watches it (the back-fill's progress
bar and summary; tests). Each outcome is told once, by the stage that decided it: an instance
skipped by selection is told at ingest (StoreOutcome.skipped), not again here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImagesClassified:
    """A study's run was recorded with scores for this many images."""

    images: int
    reported: bool  # a report was written (False: no image to report on)


@dataclass(frozen=True)
class ImagesAdopted:
    """A report by this model and weights was already in the output folder (a journal reset,
    or a crash between writing and recording it): its scores were recorded, none written."""

    images: int


@dataclass(frozen=True)
class ImageSkipped:
    """Decided by the worker: the file could not be decoded or converted, or was gone, or
    (a row journaled by an older xrvd) selection turned it down."""

    reason: str


@dataclass(frozen=True)
class ImageFailed:
    reason: str


@dataclass(frozen=True)
class StudyFailed:
    reason: str
    final: bool  # False: retried after study.retry_seconds


WorkEvent = ImagesClassified | ImagesAdopted | ImageSkipped | ImageFailed | StudyFailed
Listener = Callable[[WorkEvent], None]


def ignore(_event: WorkEvent) -> None:
    pass


@dataclass
class Tally:
    """Sums of the events; a Listener."""

    classified: int = 0
    adopted: int = 0
    failed: int = 0
    reported: int = 0
    already_reported: int = 0
    failed_studies: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def __call__(self, event: WorkEvent) -> None:
        match event:
            case ImagesClassified(images, reported):
                self.classified += images
                self.reported += reported
            case ImagesAdopted(images):
                self.adopted += images
                self.already_reported += 1
            case ImageSkipped(reason):
                self.skipped[reason] += 1
            case ImageFailed():
                self.failed += 1
            case StudyFailed():
                self.failed_studies += 1

    @property
    def images_done(self) -> int:
        return self.classified + self.adopted + self.failed + sum(self.skipped.values())
