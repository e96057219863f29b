"""The worker's stage for one image (prepare_instance), given crafted and malformed files as a
security probe sends them: each gets a reason code, never a crash and never a finding, and
only its own image is skipped, never its study. The other ways in are tested with the same
files: the store (tests/store/test_records.py), the drop folder (tests/ingest/test_watch.py),
C-STORE (tests/commands/test_serve.py), back-fill and `xrvd classify` (tests/commands/)."""

from __future__ import annotations

import pytest

from xrvd.pipeline.convert import ConvertOptions

from ..harness import CRAFTED, WG04_CR, copy_with_new_uids, prepare, write_crafted

FAST, PYDICOM = ConvertOptions(), ConvertOptions(fit="pad")  # band reader; pydicom decodes


@pytest.mark.parametrize("options", [FAST, PYDICOM], ids=["band_reader", "pydicom_decodes"])
@pytest.mark.parametrize("kind", CRAFTED)
def test_prepare_skips_the_crafted_image_and_converts_the_good_one(crafted, kind, options):
    good = prepare(WG04_CR, options, instance_id=1)
    bad = prepare(crafted[kind], options, instance_id=2)
    assert good.error is None and good.skip_reason is None
    assert good.array is not None and good.array.shape == (1, 1, 224, 224)
    # Skipped on its own: an error= would fail (and retry) the whole study, its good image too.
    assert (bad.skip_reason, bad.error, bad.array is None) == ("invalid_header", None, True)
    assert "corrected copy" in bad.skip_detail


def test_pixel_data_for_two_frames_is_multi_frame_on_either_path(tmp_path):
    """pydicom decodes the pixels of a second frame that the header does not announce, and
    refuses the two frames; the band reader read the first alone, and classified it."""
    path = tmp_path / "two-frames.dcm"
    write_crafted("two_frames_of_pixel_data", WG04_CR, path)
    verdicts = [prepare(path, options) for options in (FAST, PYDICOM)]
    assert [(p.skip_reason, p.error, p.array is None) for p in verdicts] == \
        [("multi_frame", None, True)] * 2


def test_a_value_no_check_covers_fails_only_its_own_image(tmp_path):
    """Past pydicom's checks, a value the arithmetic cannot take (a window of width 0, with
    the VOI LUT option) still fails only its own image, never its study."""
    path = tmp_path / "window-width-0.dcm"
    copy_with_new_uids(WG04_CR, path, WindowWidth=0)
    prepared = prepare(path, ConvertOptions(voi_lut=True))
    assert (prepared.skip_reason, prepared.error) == ("conversion_failed", None)
    assert "Window Width" in prepared.skip_detail and "dciodvfy" in prepared.skip_detail
