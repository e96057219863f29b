"""An instance as it arrives (ingest/incoming.py): its file stops growing at the size limit and
is gone at once, and the refusal is kept for the SCP's answer."""

from __future__ import annotations

from pathlib import Path

from xrvd.ingest.incoming import Incoming


def test_incoming_file_stops_writing_at_the_limit(tmp_path):
    incoming = Incoming(tmp_path, max_bytes=1000)
    file = incoming.open()
    file.write(b"x" * 600)
    file.flush()
    assert Path(file.name).stat().st_size == 600
    file.write(b"x" * 600)  # past the limit: the file is gone at once
    assert not Path(file.name).exists()
    file.write(b"x" * 600)  # the rest of the data set is read and dropped
    file.close()
    assert incoming.take_refusal(file.name).reason == "too_large"
    assert list(tmp_path.iterdir()) == []
