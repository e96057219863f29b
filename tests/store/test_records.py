"""The one header parse per instance (read_header): a header pydicom cannot parse, or a file that
is not DICOM, is not storable, with its reason code, and nothing is journaled."""

from __future__ import annotations

import pydicom
import pytest

from xrvd.store import NotStorableError
from xrvd.store.records import read_header

from ..harness import journal_rows


def test_a_header_pydicom_cannot_parse_is_not_storable_as_invalid_header(crafted, store,
                                                                          tmp_path):
    path = crafted["deep_nesting"]
    with pytest.raises(RecursionError):  # the probe's file: pydicom itself cannot read it
        pydicom.dcmread(path, stop_before_pixels=True, force=True)
    with pytest.raises(NotStorableError) as info:
        read_header(path)
    assert info.value.reason == "invalid_header"
    assert "nested too deeply" in str(info.value) and "dciodvfy" in str(info.value)

    with pytest.raises(NotStorableError) as info:
        store.store_file(path, source="test", move=False)
    assert info.value.reason == "invalid_header"
    assert journal_rows(store.state_dir, "SELECT COUNT(*) FROM instances") == [(0,)]

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    with pytest.raises(NotStorableError) as info:
        read_header(notes)
    assert info.value.reason == NotStorableError.reason == "not_dicom"
