"""`xrvd evaluate`: a labels table in, per-finding metrics out. Labels are made from the scores
the model gives these very images, so the expected AUROC is known exactly (1 and 0), and a
mixed finding is checked against scikit-learn; unlabelled cells are left out, a finding with
one class says why it has no AUROC, and an image that cannot be read is listed, not fatal."""

from __future__ import annotations

import csv
import json
import shutil

from sklearn.metrics import roc_auc_score

from xrvd.cli import main
from xrvd.commands.classify import classify_files
from xrvd.pipeline.models import Classifier

from ..harness import MODEL, NIH_SC, PNGS, RSNA_JPEG, WG04_CR, write_config

IMAGES = [WG04_CR, NIH_SC, RSNA_JPEG, *PNGS]


def test_evaluate_writes_the_metrics_the_labels_imply(tmp_path, ready_weights, allow_untrained,
                                                      capsys):
    weights = ready_weights(MODEL)
    folder = tmp_path / "site"
    folder.mkdir()
    names = []
    for image in IMAGES:
        shutil.copy(image, folder / image.name)
        names.append(image.name)
    classifier = Classifier.load(MODEL, weights, threads=1, allow_untrained=True)
    scores = {r.path: {f.label: f.score for f in r.findings}
              for r in classify_files([folder / n for n in names], classifier)}
    by_name = {n: scores[str(folder / n)] for n in names}
    ranked = sorted(names, key=lambda n: by_name[n]["Effusion"], reverse=True)
    effusion = {n: int(n in ranked[:2]) for n in names}  # the two highest: AUROC 1
    ranked = sorted(names, key=lambda n: by_name[n]["Cardiomegaly"])
    cardiomegaly = {n: int(n in ranked[:2]) for n in names}  # the two lowest: AUROC 0
    pneumonia = {n: v for n, v in zip(names, [1, 0, "", 1, 0], strict=True)}
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "effusion", "Cardiomegaly", "Pneumonia", "Mass"])
        for n in names:
            writer.writerow([n, effusion[n], cardiomegaly[n], pneumonia[n], 0])
        writer.writerow(["missing.dcm", 1, 1, 1, 0])  # not classified: listed, left out
    config = write_config(tmp_path, weights)
    out = tmp_path / "report"
    assert main(["evaluate", "-c", str(config), "--labels", str(folder / "labels.csv"),
                 str(out)]) == 1  # partial: one file could not be read
    printed = capsys.readouterr().out
    assert "1 image(s) could not be classified" in printed
    result = json.loads((out / "metrics.json").read_text())
    rows = {row["label"]: row for row in result["findings"]}
    assert rows["Effusion"]["auroc"] == 1.0 and rows["Effusion"]["images"] == 5
    assert rows["Cardiomegaly"]["auroc"] == 0.0
    labelled = [n for n in names if pneumonia[n] != ""]
    assert rows["Pneumonia"]["images"] == 4
    assert abs(rows["Pneumonia"]["auroc"] - roc_auc_score(
        [pneumonia[n] for n in labelled], [by_name[n]["Pneumonia"] for n in labelled])) < 1e-9
    assert "needs both" in rows["Mass"]["note"] and "auroc" not in rows["Mass"]
    assert [r["path"] for r in result["not_classified"]] == [str(folder / "missing.dcm")]
    assert result["untrained"] is True and result["model"] == MODEL
    json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: 1 / 0)  # no NaN
    # The threshold proposed for 90 % sensitivity reaches it on these images.
    effusion_row = rows["Effusion"]
    assert effusion_row["threshold_for_target"] <= min(
        by_name[n]["Effusion"] for n in names if effusion[n])
    with open(out / "metrics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["label"] for row in table] == ["Effusion", "Cardiomegaly", "Pneumonia", "Mass"]


def test_a_labels_table_that_names_no_finding_of_the_model_says_which_it_has(
        tmp_path, ready_weights, allow_untrained, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,Broken Bone\nx.dcm,1\n")
    config = write_config(tmp_path, ready_weights(MODEL))
    assert main(["evaluate", "-c", str(config), "--labels", str(labels),
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not report ['Broken Bone']" in err and "Cardiomegaly" in err
