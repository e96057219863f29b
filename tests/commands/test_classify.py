"""`xrvd classify`: files in, scores out (table, JSON, CSV), every label of the model strongest
first, untrained output marked; files that cannot be classified, crafted ones too, get their
reason and the rest is classified."""

import csv
import io
import json

import numpy as np
import pytest

from xrvd.cli import main
from xrvd.errors import EXIT_PARTIAL
from xrvd.pipeline.registry import get_spec

from ..harness import CRAFTED, MODEL, NIH_SC, PNGS, REJECT, RSNA_JPEG, WG04_CR
FILES = [WG04_CR, NIH_SC, RSNA_JPEG, PNGS[0]]


@pytest.fixture
def run(untrained_weights, allow_untrained, capsys):
    def run(*args: str, model: str = MODEL):
        code = main(["classify", *map(str, args), "--weights-dir",
                     str(untrained_weights(model))])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_json_lists_every_label_strongest_first(run):
    code, out, _ = run(*FILES, "--format", "json")
    assert code == 0
    document = json.loads(out)
    assert document["model"]["name"] == MODEL
    assert document["untrained"] is True and "NOT a diagnosis" in document["warning"]
    assert document["threshold"] == 0.5
    assert [r["file"] for r in document["results"]] == [str(f) for f in FILES]
    for result in document["results"]:
        labels = [f["label"] for f in result["findings"]]
        assert sorted(labels) == sorted(get_spec(MODEL).label_names)
        scores = [f["score"] for f in result["findings"]]
        assert scores == sorted(scores, reverse=True)
        assert all(f["positive"] == (f["score"] >= 0.5) for f in result["findings"])


def test_threshold_and_weights_alias(run):
    _, out, _ = run(NIH_SC, "--format", "json", "--weights", "densenet121-res224-rsna",
                    "--threshold", "0.9", model="densenet121-res224-rsna")
    document = json.loads(out)
    assert document["model"]["name"] == "densenet121-res224-rsna"
    assert document["threshold"] == 0.9
    findings = document["results"][0]["findings"]
    assert {f["label"] for f in findings} == {"Pneumonia", "Lung Opacity"}
    assert all(f["positive"] == (f["score"] >= 0.9) for f in findings)


def test_table_marks_untrained_output_and_sorts(run):
    code, out, _ = run(RSNA_JPEG)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == str(RSNA_JPEG)
    assert "NOT a diagnosis" in out
    rows = [line.split() for line in lines[4:] if line.strip()]
    scores = [float(next(tok for tok in row if tok.replace(".", "").isdigit())) for row in rows]
    assert len(rows) == 18 and scores == sorted(scores, reverse=True)
    assert "POSITIVE" not in out  # untrained scores are never called findings


def test_csv_has_a_row_per_file_and_label(run):
    code, out, _ = run(*FILES, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(FILES) * 18
    assert {row["untrained"] for row in rows} == {"true"}
    assert {row["file"] for row in rows} == {str(f) for f in FILES}
    assert all(0 <= float(row["score"]) <= 1 for row in rows)


def test_bad_files_are_reported_and_the_rest_classified(run, tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.touch()
    files = [NIH_SC, REJECT / "SC_rgb.dcm", empty, REJECT / "highdicom_sr_document.dcm",
             RSNA_JPEG]
    code, out, err = run(*files, "--format", "json")
    assert code == 1
    assert "3 of 5 file(s) could not be classified" in err
    results = json.loads(out)["results"]
    assert [r.get("error", {}).get("reason") for r in results] == [
        None, "not_greyscale", "empty_file", "no_pixel_data", None]
    assert len(results[0]["findings"]) == 18 and len(results[4]["findings"]) == 18

    code, out, _ = run(*files, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["error_reason"] for r in rows if r["error_reason"]] == [
        "not_greyscale", "empty_file", "no_pixel_data"]

    code, out, _ = run(*files)
    assert "NOT CLASSIFIED (not_greyscale)" in out


def test_batching_does_not_change_scores(run):
    _, one_by_one, _ = run(*FILES, "--format", "json", "--batch-size", "1")
    _, batched, _ = run(*FILES, "--format", "json", "--batch-size", "3")

    def scores(text):
        return np.array([[f["score"] for f in sorted(r["findings"], key=lambda f: f["label"])]
                         for r in json.loads(text)["results"]])

    assert np.abs(scores(one_by_one) - scores(batched)).max() < 1e-5


def test_non_finite_scores_are_never_reported(run, tmp_path):
    """White noise drives the untrained JF network to NaN: the file is reported as failed."""
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(noise).save(path)
    code, out, _ = run(path, NIH_SC, "--format", "json",
                       "--model", "jfhealthcare-densenet121-res512",
                       model="jfhealthcare-densenet121-res512")
    results = json.loads(out)["results"]
    assert results[0]["error"]["reason"] == "non_finite_scores"
    assert all(np.isfinite(f["score"]) for f in results[1]["findings"])
    assert code == 1


def test_missing_weights_exit_2_with_instructions(tmp_path, capsys):
    assert main(["classify", str(NIH_SC), "--weights-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "xrvd models fetch densenet121-res224-all" in err
    assert "xrvd models import densenet121-res224-all" in err


def test_bad_threshold_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["classify", str(NIH_SC), "--threshold", "1.7"])
    assert info.value.code == 2
    assert "must be between 0 and 1, got 1.7" in capsys.readouterr().err


def test_classify_gives_each_crafted_file_its_reason_and_classifies_the_rest(
        crafted, tmp_path, untrained_weights, allow_untrained, capsys):
    missing = tmp_path / "missing.dcm"
    files = [NIH_SC, *(crafted[kind] for kind in CRAFTED), missing, WG04_CR]

    def run(fmt: str) -> tuple[int, str, str]:
        code = main(["classify", *map(str, files), "--format", fmt, "--weights-dir",
                     str(untrained_weights(MODEL))])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = run("json")
    assert code == EXIT_PARTIAL
    assert f"{len(CRAFTED) + 1} of {len(files)} file(s) could not be classified" in err
    results = json.loads(out)["results"]
    assert [r["file"] for r in results] == [str(f) for f in files]
    assert [r.get("error", {}).get("reason") for r in results] == [
        None, *["invalid_header"] * len(CRAFTED), "unreadable", None]
    assert len(results[0]["findings"]) == 18 and len(results[-1]["findings"]) == 18
    assert not any("findings" in r for r in results[1:-1])

    code, out, _ = run("table")
    assert code == EXIT_PARTIAL
    assert out.count("NOT CLASSIFIED (invalid_header)") == len(CRAFTED)
    assert f"{WG04_CR}\n  model {MODEL}" in out
