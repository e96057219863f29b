"""`xrvd backfill --source NAME --dry-run`: what a back-fill from a PACS would retrieve, and
why not the rest. The PACS is queried as the run would query it; nothing is journaled or
retrieved, and a study the journal shows as retrieved, failed or reported before is not even
asked for its series."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import TextIO

from ..config import Config
from ..errors import EXIT_OK
from ..ingest.retrieve import make_client
from ..pipeline import package
from ..pipeline.registry import get_spec
from ..pipeline.trust import sha256
from ..pipeline.weights import weights_path
from ..sources import Source
from ..store import earlier_outcomes
from .progress import print_table


def dry_run(config: Config, source: Source, window: list[dt.date], out: TextIO) -> int:
    """A line per study found (`retrieve|skip DAY UID detail`), then the counts."""
    client = make_client(source)
    weights_sha256 = reporting_weights_sha256(config)
    actions: Counter[str] = Counter()
    for day in window:
        studies = client.find_studies(day).studies
        earlier = earlier_outcomes(config.state_dir, source.name,
                                   [s.study_uid for s in studies], config.model.name,
                                   weights_sha256)
        for study in studies:
            if study.study_uid in earlier:
                action, detail = "skip", earlier[study.study_uid]
            elif series := client.find_series(study.study_uid):
                action, detail = "retrieve", ", ".join(
                    f"{s.modality} series ({s.instances if s.instances is not None else '?'}"
                    " instances)" for s in series)
            else:
                action, detail = "skip", "no series of " + "/".join(source.modalities)
            actions[action] += 1
            out.write(f"{action:<9} {day.isoformat()} {study.study_uid}  {detail}\n")
    rows = [(key, str(count)) for key, count in actions.most_common()]
    print_table(rows or [("studies found", "0")], out,
                "xrvd backfill --dry-run: nothing was retrieved, classified or journaled")
    return EXIT_OK


def reporting_weights_sha256(config: Config) -> str | None:
    """The weights' sha256 the run would report under: the weights file's, else the installed
    model package's; None when neither is installed (a report by this model with any weights
    then counts)."""
    spec = get_spec(config.model.name)
    path = weights_path(spec, config.weights_dir)
    if path.is_file():
        return sha256(path)
    packaged = package.package_path(spec, config.weights_dir)
    if packaged.is_file():
        try:
            return package.read(packaged).weights_sha256
        except package.PackageError:
            return None
    return None
