"""`xrvd evaluate`: a labels table in, per-finding metrics out. Labels are made from the scores
the model gives these very images, so the expected AUROC is known exactly (1 and 0), and a
mixed finding is checked against scikit-learn; unlabelled cells are left out, a finding with
one class says why it has no AUROC, and an image that cannot be read is listed, not fatal."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

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
    assert result["models"] == [{"model": MODEL, "untrained": True,
                                 "weights_sha256": classifier.identity.weights_sha256}]
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


NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")
CHEXPERT_FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
                     "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                     "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                     "Fracture", "Support Devices"]


def test_nih_chestxray14s_own_label_file(tmp_path, ready_weights, allow_untrained):
    """Data_Entry_2017.csv as NIH publishes it (a lateral view is left out, as TorchXRayVision
    does), the images beside it under their own names."""
    from xrvd.commands.evaluate import read_dataset_labels

    images = tmp_path / "images"
    images.mkdir()
    for source in PNGS:  # nih_00000001_000.png -> 00000001_000.png
        shutil.copy(source, images / source.name.removeprefix("nih_"))
    labels = tmp_path / "Data_Entry_2017.csv"
    labels.write_text(NIH_HEADER +
                      "00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
                      "00027426_000.png,No Finding,0,27426,45,F,AP,2500,2048,0.168,0.168,\n"
                      "00000002_000.png,Mass,0,2,81,M,LL,2500,2048,0.171,0.171,\n")
    read = read_dataset_labels("nih", labels, images,
                               ("Cardiomegaly", "Effusion", "Mass", "Pneumonia"))
    assert [f.name for f in read.files] == ["00000001_000.png", "00027426_000.png"]
    assert read.findings == {"Cardiomegaly": [1, 0], "Effusion": [1, 0], "Mass": [0, 0],
                             "Pneumonia": [0, 0]}

    config = write_config(tmp_path, ready_weights(MODEL))
    out = tmp_path / "report"
    assert main(["evaluate", "-c", str(config), "--format", "nih", "--images", str(images),
                 "--labels", str(labels), str(out)]) == 0
    rows = {r["label"]: r for r in json.loads((out / "metrics.json").read_text())["findings"]}
    classifier = Classifier.load(MODEL, ready_weights(MODEL), threads=1, allow_untrained=True)
    scores = [{f.label: f.score for f in r.findings}
              for r in classify_files(read.files, classifier)]
    assert rows["Cardiomegaly"]["auroc"] == roc_auc_score(
        [1, 0], [s["Cardiomegaly"] for s in scores])
    assert "needs both" in rows["Mass"]["note"]


def test_chexperts_own_label_file_leaves_uncertain_labels_out(tmp_path):
    from xrvd.commands.evaluate import read_dataset_labels

    labels = tmp_path / "valid.csv"
    rows = [  # path, sex, age, frontal/lateral, AP/PA, then the findings
        ("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Male", 73,
         "Frontal", "AP", {"Cardiomegaly": 1.0, "Pleural Effusion": -1.0, "Edema": 0.0}),
        ("CheXpert-v1.0-small/valid/patient64542/study1/view1_frontal.jpg", "Female", 70,
         "Frontal", "PA", {"No Finding": 1.0}),
        ("CheXpert-v1.0-small/valid/patient64542/study1/view2_lateral.jpg", "Female", 70,
         "Lateral", "", {"Cardiomegaly": 1.0}),
    ]
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS])
        for path, sex, age, view, position, values in rows:
            writer.writerow([path, sex, age, view, position,
                             *[values.get(name, "") for name in CHEXPERT_FINDINGS]])
    (tmp_path / "images").mkdir()
    read = read_dataset_labels("chexpert", labels, tmp_path / "images",
                               ("Cardiomegaly", "Effusion", "Edema", "Pneumonia"))
    assert [str(f.relative_to(tmp_path / "images")) for f in read.files] == [
        "valid/patient64541/study1/view1_frontal.jpg",
        "valid/patient64542/study1/view1_frontal.jpg"]
    # -1 (uncertain) and blanks are left out; "No Finding" makes every finding negative.
    assert read.findings == {"Cardiomegaly": [1, 0], "Effusion": [None, 0],
                             "Edema": [0, 0], "Pneumonia": [None, 0]}


def test_several_models_are_compared_on_the_same_images(tmp_path, ready_weights,
                                                        allow_untrained):
    """Each model gets the findings it reports (the RSNA model has no Effusion)."""
    other = "densenet121-res224-rsna"
    ready_weights(MODEL)
    weights = ready_weights(other)  # the same folder: both models' weights and graphs
    folder = tmp_path / "site"
    folder.mkdir()
    for image in IMAGES:
        shutil.copy(image, folder / image.name)
    pneumonia = dict(zip((i.name for i in IMAGES), [1, 0, 1, 0, 0], strict=True))
    effusion = dict(zip((i.name for i in IMAGES), [0, 1, 1, 0, 1], strict=True))
    (folder / "labels.csv").write_text("path,Pneumonia,Effusion\n" + "".join(
        f"{name},{pneumonia[name]},{effusion[name]}\n" for name in pneumonia))
    config = write_config(tmp_path, weights)
    out = tmp_path / "report"
    assert main(["evaluate", "-c", str(config), "--labels", str(folder / "labels.csv"),
                 "-m", MODEL, "-m", other, str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [m["model"] for m in result["models"]] == [MODEL, other]
    assert [(r["model"], r["label"]) for r in result["findings"]] == [
        (MODEL, "Pneumonia"), (MODEL, "Effusion"), (other, "Pneumonia")]
    classifier = Classifier.load(other, weights, threads=1, allow_untrained=True)
    scores = {r.path: {f.label: f.score for f in r.findings}
              for r in classify_files([folder / n for n in pneumonia], classifier)}
    expected = roc_auc_score(list(pneumonia.values()),
                             [scores[str(folder / n)]["Pneumonia"] for n in pneumonia])
    assert abs(result["findings"][2]["auroc"] - expected) < 1e-9


def test_a_labels_table_larger_than_any_is_not_read(tmp_path, monkeypatch):
    from xrvd.commands import evaluate as evaluate_module
    from xrvd.commands.evaluate import LabelsError, read_dataset_labels, read_labels

    labels = tmp_path / "labels.csv"
    labels.write_text("path,Effusion\n" + "x.dcm,1\n" * 100)
    (tmp_path / "images").mkdir()
    monkeypatch.setattr(evaluate_module, "MAX_LABELS_BYTES", 100)
    for read in (lambda: read_labels(labels, ("Effusion",)),
                 lambda: read_dataset_labels("nih", labels, tmp_path / "images", ("Effusion",))):
        with pytest.raises(LabelsError, match="larger than 100 bytes"):
            read()
