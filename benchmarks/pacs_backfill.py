"""Back-fill from a PACS against back-fill from a folder of the same images.

Run by hand:  uv run python benchmarks/pacs_backfill.py [--studies 240] [--days 10]
              [--retrieve get|move|dicomweb ...] [--workers N]

It writes --studies chest studies (one 1024x1024 8-bit DX image each, the NIH Secondary
Capture with new UIDs) spread over --days days, plus one CT study per day that must never be
retrieved, loads them into an Orthanc on loopback (Debian's orthanc and orthanc-dicomweb;
result cap 100, so the busier days are split), and then, one after the other on the same
machine, each from a fresh journal:
  folder:   `xrvd backfill FOLDER -r` on the files themselves;
  get:      `xrvd backfill --source` by C-FIND + C-GET;
  move:     the same by C-MOVE to xrvd's listener;
  dicomweb: the same by QIDO-RS + WADO-RS.
It prints studies/s and images/s of each whole command (queries, retrievals, classification
and report writing; no delivery), and what the PACS sent. Untrained weights of the right
format are used: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import yaml
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' Orthanc harness

from tests.harness import PASSWORD, USER, Orthanc, free_port  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
ALLOW = {"XRVD_TESTING_ALLOW_UNTRAINED_WEIGHTS": "yes-these-scores-are-meaningless"}
MODEL = "densenet121-res224-all"
FIRST_DAY = dt.date(2024, 3, 1)
CAP = 100


def generate(folder: Path, studies: int, days: int) -> list[Path]:
    folder.mkdir(parents=True)
    chest = pydicom.dcmread(DATA / "cxr" / "nih_dx_sc_mono2_8bit.dcm")
    ct = pydicom.dcmread(DATA / "reject" / "CT_small.dcm")
    files = []
    for n in range(studies + days):
        is_ct = n >= studies
        ds = ct if is_ct else chest
        day = FIRST_DAY + dt.timedelta(days=(n - studies) if is_ct else n % days)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
            generate_uid(), generate_uid(), generate_uid())
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = ds.SeriesDate = day.strftime("%Y%m%d")
        ds.StudyTime = f"{6 + (n // days) % 14:02d}{(n * 7) % 60:02d}{n % 60:02d}"
        ds.PatientID = f"BENCH{n % 97:03d}"
        path = folder / f"{n:05d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def run(command: list[str], config: dict, scratch: Path) -> dict:
    scratch.mkdir(parents=True)
    config_path = scratch / "xrvd.yaml"
    config_path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "xrvd", *command, "-c", str(config_path)],
                          capture_output=True, text=True, env=dict(os.environ, **ALLOW))
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n"
                         f"{done.stderr[-3000:]}")
    finished = next(json.loads(line) for line in done.stdout.splitlines()
                    if '"backfill.finished"' in line)
    return {"wall_s": wall, "classified": finished["classified"],
            "reported": finished.get("reported", 0),
            "instances_retrieved": finished.get("instances_retrieved")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=240)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--retrieve", nargs="+", default=["get", "move", "dicomweb"],
                        choices=("get", "move", "dicomweb"))
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xrvd-pacs-bench-") as scratch_name:
        scratch = Path(scratch_name)
        from xrvd.pipeline.untrained import write_untrained_weights

        weights = scratch / "weights"
        write_untrained_weights(MODEL, weights)
        files = generate(scratch / "archive", args.studies, args.days)
        orthanc = Orthanc(scratch / "orthanc")
        xrvd_port = free_port()
        orthanc.configure(xrvd_port, find_cap=CAP, dicomweb="dicomweb" in args.retrieve)
        orthanc.start()
        try:
            started = time.perf_counter()
            for path in files:
                orthanc.upload(path)
            print(f"cores available: {len(os.sched_getaffinity(0))}, model {MODEL}; "
                  f"{args.studies} chest studies (1024x1024 8-bit DX) and {args.days} CT "
                  f"studies over {args.days} days, loaded into Orthanc in "
                  f"{time.perf_counter() - started:.0f} s (result cap {CAP})")
            base = {"model": {"name": MODEL, "weights_dir": str(weights), "threads": 0},
                    "log": {"level": "info"}, "scp": {"enabled": False}}
            until = FIRST_DAY + dt.timedelta(days=args.days - 1)
            window = ["--since", FIRST_DAY.isoformat(), "--until", until.isoformat()]
            workers = [] if args.workers is None else ["--workers", str(args.workers)]
            print(f"{'path':<10} {'wall s':>7} {'studies/s':>10} {'images/s':>9}  notes")
            runs = [("folder", ["backfill", "-r", str(scratch / "archive"), *workers], {})]
            for how in args.retrieve:
                source = ({"name": "pacs", "type": "dicomweb", "url": orthanc.dicomweb_url,
                           "auth": {"type": "basic", "username": USER, "password": PASSWORD}}
                          if how == "dicomweb" else
                          {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                           "port": orthanc.dicom_port, "retrieve": how})
                extra = {"scp": {"enabled": True, "port": xrvd_port,
                                 "allowed_calling_aets": ["ORTHANC"]}} if how == "move" else {}
                runs.append((how, ["backfill", "--source", "pacs", *window, *workers],
                             {"sources": [{**source, "result_cap": CAP}], **extra}))
            for name, command, settings in runs:
                config = {**base, **settings, "state_dir": str(scratch / name / "state"),
                          "output": {"folder": str(scratch / name / "out")}}
                result = run(command, config, scratch / name)
                studies = result["reported"]
                note = "" if name == "folder" else \
                    f"{result['instances_retrieved']} instances retrieved (no CT)"
                print(f"{name:<10} {result['wall_s']:>7.1f} {studies / result['wall_s']:>10.2f} "
                      f"{result['classified'] / result['wall_s']:>9.2f}  {note}")
        finally:
            orthanc.stop()


if __name__ == "__main__":
    main()
