"""`xrvd export` without a journal says what to run first. Exports of real results (CSV,
JSON lines, Parquet) are checked after the back-fills in test_backfill.py."""

from __future__ import annotations

import pytest

from xrvd.cli import main

from ..harness import MODEL, write_config


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_without_a_journal_says_what_to_run(tmp_path, untrained_weights, capsys, fmt):
    config = write_config(tmp_path, untrained_weights(MODEL))
    assert main(["export", "-c", str(config), "--format", fmt, str(tmp_path / "x")]) == 2
    assert "xrvd backfill" in capsys.readouterr().err
