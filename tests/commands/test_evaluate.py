"""`xrvd evaluate`: a labels table in, per-finding metrics, plots and a report out. Labels are
made from the scores the model gives these very images, so the expected AUROC is known exactly
(1 and 0), and a mixed finding is checked against scikit-learn; unlabelled cells are left out,
a finding with one class says why it has no AUROC, and an image that cannot be read is listed,
not fatal. Per-finding thresholds, proposed thresholds written as config, and scores taken
from the journal are checked here too; the report in a real browser in
test_evaluate_report.py."""

from __future__ import annotations

import csv
import json
import shutil
import sys

import pydicom
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from xrvd.cli import main
from xrvd.commands.classify import classify_files
from xrvd.config import load_config
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import get_spec
from xrvd.stats import at_threshold
from xrvd.thresholds import Thresholds

from ..harness import MODEL, NIH_SC, PNGS, RSNA_JPEG, WG04_CR, copy_with_new_uids, write_config

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
    # Pneumonia at a threshold of its own (the config's spelling need not be the model's).
    labelled = [n for n in names if pneumonia[n] != ""]
    own = sorted(by_name[n]["Pneumonia"] for n in labelled)[1]
    config = write_config(tmp_path, weights, model={"thresholds": {"pneumonia": own}})
    out = tmp_path / "report"
    assert main(["evaluate", "-c", str(config), "--labels", str(folder / "labels.csv"),
                 str(out)]) == 1  # partial: one file could not be read
    printed = capsys.readouterr().out
    assert "1 image(s) could not be classified" in printed
    result = json.loads((out / "metrics.json").read_text())
    rows = {row["label"]: row for row in result["findings"]}
    assert rows["Effusion"]["auroc"] == 1.0 and rows["Effusion"]["images"] == 5
    assert rows["Cardiomegaly"]["auroc"] == 0.0
    assert rows["Pneumonia"]["images"] == 4
    called = [n for n in labelled if by_name[n]["Pneumonia"] >= own]
    positives = [n for n in labelled if pneumonia[n] == 1]
    assert rows["Pneumonia"]["threshold"] == own and rows["Effusion"]["threshold"] == 0.5
    assert rows["Pneumonia"]["sensitivity"] == \
        len([n for n in positives if n in called]) / len(positives)
    assert abs(rows["Pneumonia"]["auroc"] - roc_auc_score(
        [pneumonia[n] for n in labelled], [by_name[n]["Pneumonia"] for n in labelled])) < 1e-9
    assert "needs both" in rows["Mass"]["note"] and "auroc" not in rows["Mass"]
    assert [r["path"] for r in result["not_classified"]] == [str(folder / "missing.dcm")]
    assert result["models"] == [{
        "model": MODEL, "untrained": True, "weights_sha256": classifier.identity.weights_sha256,
        "thresholds": f"0.5; Pneumonia {own:g}", "scores_from_journal": 0,
        "scores_computed": 5, "not_scored": 1}]
    json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: 1 / 0)  # no NaN
    # The threshold proposed for 90 % sensitivity reaches it on these images.
    effusion_row = rows["Effusion"]
    assert effusion_row["threshold_for_target"] <= min(
        by_name[n]["Effusion"] for n in names if effusion[n])
    with open(out / "metrics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["label"] for row in table] == ["Effusion", "Cardiomegaly", "Pneumonia", "Mass"]
    # The pictures: three per finding with both classes (Mass has none), in the page too.
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{kind}-{finding}.png" for kind in ("roc", "calibration", "histogram")
        for finding in ("effusion", "cardiomegaly", "pneumonia"))
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 9
    assert "UNTRAINED" in page and classifier.identity.weights_sha256 in page
    assert "report.html (9 plots)" in printed


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
    # A threshold for a finding the RSNA model does not report is left out for it, not an
    # error: the config was written for the other model.
    config = write_config(tmp_path, weights, model={"thresholds": {"Effusion": 0.3}})
    out = tmp_path / "report"
    assert main(["evaluate", "-c", str(config), "--labels", str(folder / "labels.csv"),
                 "-m", MODEL, "-m", other, str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [m["model"] for m in result["models"]] == [MODEL, other]
    assert [m["thresholds"] for m in result["models"]] == ["0.5; Effusion 0.3", "0.5"]
    assert [(r["model"], r["label"], r["threshold"]) for r in result["findings"]] == [
        (MODEL, "Pneumonia", 0.5), (MODEL, "Effusion", 0.3), (other, "Pneumonia", 0.5)]
    # one ROC plot per finding, with every model that reports it
    assert sorted(p.name for p in out.glob("roc-*.png")) == ["roc-effusion.png",
                                                             "roc-pneumonia.png"]
    classifier = Classifier.load(other, weights, threads=1, allow_untrained=True)
    scores = {r.path: {f.label: f.score for f in r.findings}
              for r in classify_files([folder / n for n in pneumonia], classifier)}
    expected = roc_auc_score(list(pneumonia.values()),
                             [scores[str(folder / n)]["Pneumonia"] for n in pneumonia])
    assert abs(result["findings"][2]["auroc"] - expected) < 1e-9


def test_a_labels_table_larger_than_any_is_not_read(tmp_path, monkeypatch):
    from xrvd.commands import evaluate_labels
    from xrvd.commands.evaluate import LabelsError, read_dataset_labels, read_labels

    labels = tmp_path / "labels.csv"
    labels.write_text("path,Effusion\n" + "x.dcm,1\n" * 100)
    (tmp_path / "images").mkdir()
    monkeypatch.setattr(evaluate_labels, "MAX_LABELS_BYTES", 100)
    for read in (lambda: read_labels(labels, ("Effusion",)),
                 lambda: read_dataset_labels("nih", labels, tmp_path / "images", ("Effusion",))):
        with pytest.raises(LabelsError, match="larger than 100 bytes"):
            read()


def test_a_labels_table_from_a_pipe_is_read_no_further_than_the_bound(tmp_path, monkeypatch):
    """A pipe's size says nothing: the reader stops at the bound all the same."""
    import os
    import threading

    from xrvd.commands import evaluate_labels
    from xrvd.commands.evaluate import LabelsError, read_labels

    monkeypatch.setattr(evaluate_labels, "MAX_LABELS_BYTES", 100)
    pipe = tmp_path / "labels.csv"
    os.mkfifo(pipe)
    written = []

    def feed() -> None:
        try:
            with open(pipe, "w") as handle:
                handle.write("path,Effusion\n" + "x.dcm,1\n" * 100_000)
                written.append("all")
        except BrokenPipeError:  # the reader stopped at the bound and closed its end
            written.append("stopped")

    feeder = threading.Thread(target=feed)
    feeder.start()
    with pytest.raises(LabelsError, match="larger than 100 bytes"):
        read_labels(pipe, ("Effusion",))
    feeder.join(timeout=30)
    assert written == ["stopped"]


def _site(tmp_path, images=IMAGES):
    """The images copied into <tmp_path>/site, by name."""
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    for image in images:
        shutil.copy(image, folder / image.name)
    return folder, [image.name for image in images]


def _scores(files, weights, model=MODEL) -> dict[str, dict[str, float]]:
    classifier = Classifier.load(model, weights, threads=1, allow_untrained=True)
    return {r.path: {f.label: f.score for f in r.findings}
            for r in classify_files(files, classifier)}


@pytest.mark.parametrize("metric, target", [("sensitivity", 0.6), ("specificity", 0.5)])
def test_written_thresholds_reach_the_target_once_in_the_config(
        tmp_path, ready_weights, allow_untrained, capsys, metric, target):
    """--write-thresholds prints the `model:` section exactly as the file holds it; a config
    with it gives Thresholds that reach the target on the same images; a finding with one
    class is left out with a comment that says why."""
    weights = ready_weights(MODEL)
    folder, names = _site(tmp_path)
    scores = _scores([folder / n for n in names], weights)
    effusion = dict(zip(names, [1, 0, 1, 1, 0], strict=True))
    edema = dict(zip(names, [0, 1, 1, 0, 1], strict=True))
    (folder / "labels.csv").write_text("path,Effusion,Edema,Mass\n" + "".join(
        f"{n},{effusion[n]},{edema[n]},0\n" for n in names))
    # The snippet replaces the config's model section: a threshold the config already gives
    # a finding not labelled here stays.
    config = write_config(tmp_path, weights, model={"thresholds": {"Cardiomegaly": 0.7}})
    out = tmp_path / "report"
    assert main(["evaluate", "-c", str(config), "--labels", str(folder / "labels.csv"),
                 f"--target-{metric}", str(target), "--write-thresholds", str(out)]) == 0
    printed = capsys.readouterr().out
    snippet = (out / "thresholds.yaml").read_text()
    assert snippet in printed and snippet.startswith(f"# {MODEL} (weights sha256 ")
    assert "    # Mass: left out, 0 positive and 5 negative images here (a threshold needs " \
        "both)" in snippet.splitlines()
    written = yaml.safe_load(snippet)
    assert written["model"]["threshold"] == 0.5
    assert set(written["model"]["thresholds"]) == {"Effusion", "Edema", "Cardiomegaly"}
    assert "    Cardiomegaly: 0.7  # kept from the config (not labelled here)" in \
        snippet.splitlines()
    metrics = {r["label"]: r for r in json.loads((out / "metrics.json").read_text())["findings"]}
    assert {label: metrics[label]["threshold_for_target"] for label in ("Effusion", "Edema")} \
        == {label: written["model"]["thresholds"][label] for label in ("Effusion", "Edema")}

    again = load_config(write_config(tmp_path, weights, model=written["model"]))
    thresholds = Thresholds.of_config(again.model, get_spec(MODEL).label_names)
    for finding, truth in (("Effusion", effusion), ("Edema", edema)):
        values = [scores[str(folder / n)][finding] for n in names]
        called = at_threshold(values, [truth[n] for n in names], thresholds.of(finding))
        assert getattr(called, metric) >= target, (finding, thresholds)


def test_scores_come_from_the_journal_for_images_these_weights_classified(
        tmp_path, ready_weights, allow_untrained, capsys):
    """Back-filled images are matched by path or by SOP Instance UID alone (even once their
    file is gone); images the journal has not scored are classified when the table gives
    their file, listed as not scored when it names them by UID alone; a file changed since
    the back-fill is classified again; another model finds nothing of this one's."""
    weights = ready_weights(MODEL)
    archive = tmp_path / "archive"
    uids = {}
    for source in (WG04_CR, NIH_SC, RSNA_JPEG):
        uids[source.name] = copy_with_new_uids(source, archive / source.name).SOPInstanceUID
    gone = tmp_path / "gone" / "gone.dcm"
    gone_uid = copy_with_new_uids(NIH_SC, gone).SOPInstanceUID
    config = write_config(tmp_path, weights)
    assert main(["backfill", "-c", str(config), "--workers", "0", "--log-level", "error",
                 str(archive), str(gone.parent)]) == 0
    kept = tmp_path / "kept.dcm"
    shutil.move(gone, kept)  # the journal still holds its scores
    folder, pngs = _site(tmp_path, PNGS)
    # the files of the scored rows below, in their order
    files = [archive / WG04_CR.name, archive / NIH_SC.name, archive / RSNA_JPEG.name, kept,
             *(folder / n for n in pngs)]
    computed = _scores(files, weights)
    never = "1.2.826.0.1.3680043.8.498.1"
    rows = [  # path, sop_instance_uid, Pneumonia (both models report it)
        (str(archive / WG04_CR.name), "", 1),  # by path
        ("", uids[NIH_SC.name], 0),  # by UID alone
        (str(archive / RSNA_JPEG.name), uids[RSNA_JPEG.name], 1),  # by both
        ("", gone_uid, 1),  # by UID: its file is gone
        ("", never, 0),  # not in the journal: not scored
        *((str(folder / n), "", y) for n, y in zip(pngs, (0, 1), strict=True)),  # computed
    ]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "SOPInstanceUID", "Pneumonia"])
        writer.writerows(rows)
    out = tmp_path / "report"
    assert main(["evaluate", "-c", str(config), "--labels", str(labels), "--from-journal",
                 str(out)]) == 1  # one image not scored
    printed = capsys.readouterr().out
    assert "scores: 4 from the journal, 2 computed, 1 not scored" in printed
    result = json.loads((out / "metrics.json").read_text())
    assert result["from_journal"] is True
    assert (result["models"][0]["scores_from_journal"], result["models"][0]["scores_computed"]) \
        == (4, 2)
    assert result["not_classified"] == [{"path": None, "sop_instance_uid": never,
                                         "reason": "not_in_journal", "models": [MODEL]}]
    # The journal's scores are the model's scores of those very files.
    [row] = result["findings"]
    assert row["images"] == 6
    assert abs(row["auroc"] - roc_auc_score(
        [1, 0, 1, 1, 0, 1], [computed[str(path)]["Pneumonia"] for path in files])) < 1e-9

    # A file changed since the back-fill holds other pixels: classified again.
    changed = pydicom.dcmread(archive / WG04_CR.name)
    changed.PatientName = "CHANGED^AFTER"
    changed.save_as(archive / WG04_CR.name)
    assert main(["evaluate", "-c", str(config), "--labels", str(labels), "--from-journal",
                 str(out)]) == 1
    assert "scores: 3 from the journal, 3 computed, 1 not scored" in capsys.readouterr().out

    # Another model (other weights) finds none of these scores: what has a file is computed.
    other = "densenet121-res224-rsna"
    ready_weights(other)
    assert main(["evaluate", "-c", str(config), "--labels", str(labels), "--from-journal",
                 "-m", other, str(out)]) == 1
    assert "scores: 0 from the journal, 4 computed, 3 not scored" in capsys.readouterr().out


def test_images_named_by_uid_alone_need_the_journal(tmp_path, ready_weights, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("sop_instance_uid,Effusion\n1.2.3,1\n")
    config = write_config(tmp_path, ready_weights(MODEL))
    assert main(["evaluate", "-c", str(config), "--labels", str(labels),
                 str(tmp_path / "out")]) == 2
    assert "add --from-journal" in capsys.readouterr().err
    # ... and a journal: without one, the command says what to run first
    assert main(["evaluate", "-c", str(config), "--labels", str(labels), "--from-journal",
                 str(tmp_path / "out")]) == 2
    assert "xrvd backfill" in capsys.readouterr().err


def test_without_matplotlib_the_report_has_the_tables_and_says_what_to_install(
        tmp_path, ready_weights, allow_untrained, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the plots extra were absent
    folder, names = _site(tmp_path, PNGS)
    (folder / "labels.csv").write_text(f"path,Effusion\n{names[0]},1\n{names[1]},0\n")
    out = tmp_path / "report"
    out.mkdir()
    for name in ("roc-effusion.png", "ours.png"):  # an earlier run's plot, a file of the user's
        (out / name).write_bytes(b"png")
    assert main(["evaluate", "-c", str(write_config(tmp_path, ready_weights(MODEL))),
                 "--labels", str(folder / "labels.csv"), str(out)]) == 0
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if "uv sync --extra plots" in line] == [
        "plots: matplotlib is not installed, so report.html has the tables alone; `uv sync "
        "--extra plots` (or the full install) adds them"]
    page = (out / "report.html").read_text()
    assert "<img" not in page and "uv sync --extra plots" in page
    assert "<td class=\"text\">Effusion</td>" in page
    assert [p.name for p in out.glob("*.png")] == ["ours.png"]
    assert json.loads((out / "metrics.json").read_text())["findings"][0]["auroc"] in (0.0, 1.0)


def test_one_target_at_a_time(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--labels", "x.csv", "--target-sensitivity", "0.9",
              "--target-specificity", "0.9", "out"])
    assert "not allowed with argument" in capsys.readouterr().err
