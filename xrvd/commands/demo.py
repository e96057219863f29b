"""`xrvd demo`: the whole classification path on a bundled sample, honestly.

With the configured model's weights present (or downloadable) the demo shows real findings.
Without them (an offline machine) it says so, and runs the same pipeline on UNTRAINED random
weights kept in a temporary folder, with every line marked as meaningless, so the user can see
the plumbing work without mistaking the output for a diagnosis.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import IO

from ..config import Config
from ..errors import DownloadError, WeightsMissingError
from ..pipeline.convert import ConvertOptions
from ..pipeline.models import Classifier
from ..pipeline.registry import get_spec
from ..pipeline.untrained import UNTRAINED_BANNER, write_untrained_weights
from ..thresholds import Thresholds
from .classify import classify_files, render_table

SAMPLE = "rsna_cr_chest_jpeg_baseline.dcm"


def sample_path() -> Path:
    return Path(str(resources.files("xrvd") / "samples" / SAMPLE))


def run_demo(config: Config, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    spec = get_spec(config.model.name)
    sample = sample_path()
    print(f"xrvd demo: classifying the bundled chest X-ray {sample.name} with {spec.name}",
          file=err)
    try:
        classifier = Classifier.load(spec.name, config.weights_dir, allow_download=True,
                                     download_url=config.model.download_url,
                                     device=config.model.device, threads=config.model.threads)
    except (DownloadError, WeightsMissingError) as exc:
        print(f"\nThe real weights are not available here:\n  {exc}\n", file=err)
        print("The demo goes on with UNTRAINED random weights in a temporary folder, to show "
              "the pipeline working end to end.\nTHE SCORES BELOW ARE MEANINGLESS AND NOT A "
              "DIAGNOSIS.\n", file=err)
        return _run_untrained(config, sample, out, err)
    _classify_and_print(classifier, config, sample, out)
    return 0


def _run_untrained(config: Config, sample: Path, out: IO[str], err: IO[str]) -> int:
    spec = get_spec(config.model.name)
    with tempfile.TemporaryDirectory(prefix="xrvd-demo-untrained-") as scratch:
        write_untrained_weights(spec.name, Path(scratch))
        classifier = Classifier.load(spec.name, Path(scratch), allow_untrained=True,
                                     device=config.model.device, threads=config.model.threads)
        _classify_and_print(classifier, config, sample, out)
    print(f"\n{UNTRAINED_BANNER}.\nFor real findings put the weights in place, then run "
          f"the demo again:\n  xrvd models fetch {spec.name}            (with internet access)"
          f"\n  xrvd models import {spec.name} FILE      (file carried in: {spec.weights_file})",
          file=err)
    return 0


def _classify_and_print(classifier: Classifier, config: Config, sample: Path,
                        out: IO[str]) -> None:
    options = ConvertOptions(**config.convert.model_dump())
    thresholds = Thresholds.of_config(config.model, classifier.labels)
    results = classify_files([sample], classifier, threshold=thresholds, options=options)
    print(render_table(results, classifier.identity, thresholds), file=out)
