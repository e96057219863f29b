"""The worker's typed events and their sums."""

from __future__ import annotations

from xrvd.events import (
    ImageFailed,
    ImagesAdopted,
    ImagesClassified,
    ImageSkipped,
    StudyFailed,
    Tally,
)


def test_a_tally_sums_every_kind_of_event():
    tally = Tally()
    for event in (ImagesClassified(3, reported=True), ImagesClassified(0, reported=False),
                  ImagesAdopted(2), ImageSkipped("truncated"), ImageSkipped("truncated"),
                  ImageSkipped("file_missing"), ImageFailed("non_finite_scores"),
                  StudyFailed("boom", final=False)):
        tally(event)
    assert (tally.classified, tally.reported, tally.adopted, tally.already_reported) == \
        (3, 1, 2, 1)
    assert tally.skipped == {"truncated": 2, "file_missing": 1}
    assert (tally.failed, tally.failed_studies) == (1, 1)
    assert tally.images_done == 3 + 2 + 3 + 1
