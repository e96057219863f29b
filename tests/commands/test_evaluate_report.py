"""`xrvd evaluate`'s HTML report opened in a real browser (Debian's chromium, driven by
playwright): every plot image loads from the page itself (no request leaves it), the expected
plots are there, text from the user's files is escaped, and a full-page screenshot is taken
(copied to $XRVD_SCREENSHOT_DIR when set, for a person to look at).

The report is a realistic one: two models compared on 400 simulated images with four
findings of different difficulty and one finding labelled with one class only, its rows
computed by evaluate's own metrics code.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from xrvd.commands.evaluate import COLUMNS, Target, metrics_for
from xrvd.commands.evaluate_report import write_report

from ..harness import require_tool

MODELS = {"densenet121-res224-all": "3f8a" * 16, "densenet121-res224-chex": "9c1e" * 16}
# finding -> (prevalence, each model's separation in standard deviations)
FINDINGS = {"Cardiomegaly": (0.25, (1.9, 1.4)), "Effusion": (0.3, (2.2, 2.4)),
            "Pneumothorax": (0.08, (1.1, 0.7)), "Edema": (0.15, (1.5, 1.6)),
            "Fracture": (0.0, (1.0, 1.0))}
IMAGES = 400
HOSTILE = 'site <b>"labels"</b> & <script>alert(1)</script>.csv'


def _realistic_report(out):
    rng = np.random.default_rng(19)
    rows, curves = [], {}
    for finding, (prevalence, separations) in FINDINGS.items():
        truth = (rng.uniform(size=IMAGES) < prevalence).astype(np.int64)
        shared = rng.normal(size=IMAGES)  # both models see the same images
        for (model, _), separation in zip(MODELS.items(), separations, strict=True):
            logits = separation * truth + 0.8 * shared + 0.6 * rng.normal(size=IMAGES) - 1.0
            scores = 1 / (1 + np.exp(-logits))
            threshold = 0.62 if finding == "Cardiomegaly" else 0.5
            rows.append({"model": model, "label": finding, **metrics_for(
                list(scores), list(truth), threshold, Target("sensitivity", 0.9))})
            curves[model, finding] = (scores, truth)
    summary = {
        "models": [{"model": model, "weights_sha256": sha, "untrained": False,
                    "thresholds": "0.5; Cardiomegaly 0.62", "scores_from_journal": 250,
                    "scores_computed": IMAGES - 250, "not_scored": 1}
                   for model, sha in MODELS.items()],
        "labels_file": f"/srv/validation/{HOSTILE}", "images": IMAGES + 1,
        "target": {"sensitivity": 0.9}, "from_journal": True,
        "not_classified": [{"path": "/srv/validation/<img src=x onerror=alert(1)>.dcm",
                            "sop_instance_uid": None, "reason": "not_dicom",
                            "models": list(MODELS)}],
    }
    return write_report(out, summary, rows, curves, COLUMNS)


def test_the_report_opens_offline_in_chromium_with_every_plot(tmp_path):
    chromium = require_tool("chromium", "chromium")
    from playwright.sync_api import sync_playwright

    out = tmp_path / "report"
    out.mkdir()
    report = _realistic_report(out)
    plotted = [f for f, (prevalence, _) in FINDINGS.items() if prevalence > 0]
    assert len(report.images) == 3 * len(plotted) and not report.missing
    page_text = report.html.read_text()
    assert HOSTILE not in page_text and "<script" not in page_text

    screenshot = tmp_path / "report.png"
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(report.html.as_uri(), wait_until="load")
            images = page.evaluate("""() => Array.from(document.images).map(image => ({
                kind: image.dataset.kind, alt: image.alt, complete: image.complete,
                width: image.naturalWidth, source: image.src.slice(0, 22)}))""")
            headings = page.locator("h1").inner_text()
            untrained = page.locator(".warning").count()
            rows = page.locator("table tr").count()
            scripts = page.locator("script").count()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert len(images) == 3 * len(plotted)
    broken = [image for image in images if not image["complete"] or image["width"] <= 0]
    assert not broken, broken
    assert {image["source"] for image in images} == {"data:image/png;base64,"}
    assert sorted(image["alt"] for image in images) == sorted(
        f"{finding}: {kind}" for finding in plotted
        for kind in ("roc", "calibration", "histogram"))
    # Nothing is fetched but the page itself: it opens offline.
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    # The user's file names are shown as text, never run.
    assert HOSTILE in headings and scripts == 0 and untrained == 0
    # models table (header + 2), metrics (2 x (header + 5 findings)), the image not classified
    assert rows == 3 + 2 * (1 + len(FINDINGS)) + 2
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("XRVD_SCREENSHOT_DIR"):
        folder = os.environ["XRVD_SCREENSHOT_DIR"]
        os.makedirs(folder, exist_ok=True)
        shutil.copy(screenshot, os.path.join(folder, "evaluate-report.png"))
