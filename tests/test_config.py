"""The configuration: embedded defaults, the documented example, and every kind of error
named with its key and fix."""

from pathlib import Path

import pytest
import yaml

from xrvd.config import Config, load_config
from xrvd.errors import ConfigError

from .harness import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xrvd.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.problems


def test_embedded_defaults():
    config = load_config(None)
    assert config.model.name == "densenet121-res224-all"
    assert config.model.threshold == 0.5
    assert config.model.allow_download is False
    assert config.weights_dir == config.state_dir / "models"
    assert config.convert.fit == "crop" and not config.convert.voi_lut
    assert config.log.include_patient_identifiers is False


def test_documented_example_is_valid_and_matches_the_defaults():
    example = load_config(REPO / "config" / "xrvd.yaml")
    raw = yaml.safe_load((REPO / "config" / "xrvd.yaml").read_text())
    assert example.model.name == raw["model"]["name"]
    # The example documents every key; anything it sets differently from the code's
    # defaults must be a path (the example uses the service's state folder).
    defaults = Config(state_dir=example.state_dir).model_dump()
    assert example.model_dump() == defaults


def test_threshold_out_of_range_names_key_and_fix(tmp_path):
    assert problems(tmp_path, "model:\n  threshold: 1.7\n") == [
        "model.threshold: must be between 0 and 1, got 1.7"
    ]


def test_unknown_key_suggests_the_right_one(tmp_path):
    assert problems(tmp_path, "model:\n  treshold: 0.4\n") == [
        "model.treshold: unknown key; did you mean 'threshold'?"
    ]
    [message] = problems(tmp_path, "nonsense: 1\n")
    assert message.startswith("nonsense: unknown key; known keys here: state_dir, model")


def test_wrong_types_and_impossible_values(tmp_path):
    found = problems(tmp_path, (
        "model:\n  batch_size: eight\n  allow_download: maybe\n  name: densenet121-res224-nh\n"
        "  threads: -1\nconvert:\n  fit: stretch\nlog: 3\n"
    ))
    assert "model.batch_size: must be a whole number, got text 'eight'" in found
    assert "model.allow_download: must be true or false, got 'maybe'" in found
    assert any(p.startswith("model.name: unknown model 'densenet121-res224-nh'; did you mean "
                            "'densenet121-res224-nih'?") for p in found)
    assert "model.threads: must be >= 0, got -1" in found
    assert "convert.fit: must be one of 'crop' or 'pad', got 'stretch'" in found
    assert "log: must be a mapping of keys, got a number" in found
    assert len(found) == 6


def test_yaml_syntax_error_gives_the_line(tmp_path):
    [message] = problems(tmp_path, "model:\n  threshold: [0.5\n")
    assert message.startswith("line 3, column 1: not valid YAML")


def test_top_level_must_be_a_mapping(tmp_path):
    assert problems(tmp_path, "- a\n- b\n") == [
        "the top level must be a mapping of sections, got a list"
    ]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "absent.yaml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    config = load_config(write(tmp_path, "state_dir: state\nmodel:\n  weights_dir: w\n"))
    assert config.state_dir == tmp_path / "state"
    assert config.weights_dir == tmp_path / "w"


def test_weights_dir_defaults_under_the_state_dir(tmp_path):
    config = load_config(write(tmp_path, f"state_dir: {tmp_path}/s\n"))
    assert config.weights_dir == tmp_path / "s" / "models"


def test_destinations_are_validated(tmp_path):
    found = problems(tmp_path, (
        "destinations:\n  - name: pacs\n    ae_title: ABCDEFGHIJKLMNOPQ\n    host: h\n"
        "    port: 70000\n  - name: pacs\n    ae_title: P\n    host: h\n    port: 104\n"))
    assert any(p.startswith("destinations.0.ae_title: must be 1 to 16") for p in found)
    assert "destinations.0.port: must be <= 65535, got 70000" in found
    [message] = problems(tmp_path, "destinations:\n  - {name: a, ae_title: A, host: h, "
                                   "port: 104}\n  - {name: a, ae_title: B, host: h, port: 105}\n")
    assert "destination names must be unique" in message


def test_storage_bounds_are_validated(tmp_path):
    found = problems(tmp_path, "storage:\n  min_free_mb: -5\n  keep_spool: weeks 2\n"
                               "scp:\n  max_pending: 0\n")
    assert "storage.min_free_mb: must be >= 0, got -5" in found
    assert "storage.keep_spool: must be none, failed or 'days N', got 'weeks 2'" in found
    assert "scp.max_pending: must be >= 1, got 0" in found
    config = load_config(write(tmp_path, "storage:\n  keep_spool: days 7\n"))
    assert config.storage.keep_days == 7.0
