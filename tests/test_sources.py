"""The `sources:` config (PACS a back-fill queries) and its daily schedule."""

from __future__ import annotations

import datetime as dt

import pytest

from xrvd.config import validate_config
from xrvd.errors import ConfigError
from xrvd.sources import Schedule

PACS = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}


def test_a_source_needs_only_the_pacs_address():
    source = validate_config({"sources": [PACS]}).source("pacs")
    assert (source.retrieve, source.modalities, source.result_cap) == ("get", ["CR", "DX"], 500)
    assert source.max_concurrent_retrieves == 1  # polite by default
    assert source.destination_ae == "XRVD"


@pytest.mark.parametrize("change, message", [
    ({"modalities": ["CR", "D X"]}, "modality codes"),
    ({"schedule": "7pm-7am"}, "19:00-07:00"),
    ({"schedule": "19:00-19:00"}, "19:00-07:00"),
    ({"result_cap": 1}, "result_cap"),
    ({"retrieve": "push"}, "retrieve"),
])
def test_bad_source_settings_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"sources": [{**PACS, **change}]})


def test_source_names_are_unique_and_looked_up_by_name():
    with pytest.raises(ConfigError, match="repeated"):
        validate_config({"sources": [PACS, PACS]})
    config = validate_config({"sources": [PACS]})
    with pytest.raises(ConfigError, match="no source named 'vna'.*known: pacs"):
        config.source("vna")


def test_modalities_are_upper_case():
    source = validate_config({"sources": [{**PACS, "modalities": ["cr", " dx"]}]}).source("pacs")
    assert source.modalities == ["CR", "DX"]


@pytest.mark.parametrize("window, at, open_now, wait_s", [
    ("19:00-07:00", "2024-01-02 18:59:30", False, 30),
    ("19:00-07:00", "2024-01-02 19:00:00", True, 0),
    ("19:00-07:00", "2024-01-03 06:59:59", True, 0),
    ("19:00-07:00", "2024-01-03 07:00:00", False, 12 * 3600),
    ("08:00-18:00", "2024-01-02 18:30:00", False, 13.5 * 3600),
    ("08:00-18:00", "2024-01-02 07:00:00", False, 3600),
])
def test_schedule_windows_cross_midnight(window, at, open_now, wait_s):
    schedule = Schedule.parse(window)
    when = dt.datetime.fromisoformat(at)
    assert schedule.open_at(when) is open_now
    assert schedule.seconds_until_open(when) == wait_s
