"""Command line: argument parsing and dispatch only. `main(argv) -> exit code`.

Exit codes: 0 done; 1 some inputs could not be classified (the rest were); 2 usage,
configuration or model errors (nothing was done).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, ConfigError, XrvdError


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _date(text: str):
    from .commands.backfill import parse_date

    try:
        return parse_date(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _modalities(text: str) -> tuple[str, ...]:
    names = tuple(m.strip().upper() for m in text.split(",") if m.strip())
    if not names or not all(m.isalnum() and len(m) <= 16 for m in names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of modalities like CR,DX")
    return names


def build_parser() -> argparse.ArgumentParser:
    from .commands.classify import FORMATS
    from .commands.export import FORMATS as EXPORT_FORMATS
    from .pipeline.registry import MODELS

    parser = argparse.ArgumentParser(
        prog="xrvd", description="DICOM integration daemon for chest X-ray AI "
        "(TorchXRayVision models, DICOM SR output).")
    parser.add_argument("--version", action="version", version=f"xrvd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE",
                        default=os.environ.get("XRVD_CONFIG"),
                        help="YAML config file (default: $XRVD_CONFIG, else built-in defaults)")
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default=None, help="events on stderr (default: warning)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = sub.add_parser(
        "classify", parents=[common], help="classify image files (DICOM, PNG, JPEG)",
        description="Score chest X-ray files with one model and print each label's score and "
        "call, strongest findings first.")
    classify.add_argument("files", nargs="+", metavar="FILE")
    classify.add_argument("-m", "--model", "--weights", dest="model", choices=list(MODELS),
                          metavar="NAME", help="model (default: model.name from the config); "
                          "--weights is accepted as in TorchXRayVision's scripts")
    classify.add_argument("-t", "--threshold", type=_threshold,
                          help="call every finding positive at or above this score "
                          "(default: model.threshold, 0.5, the operating point the "
                          "calibration maps to 0.5, and model.thresholds for the findings "
                          "given their own)")
    classify.add_argument("-f", "--format", choices=FORMATS, default="table")
    classify.add_argument("--batch-size", type=_positive_int)
    classify.add_argument("--weights-dir", type=Path, help="override model.weights_dir")

    evaluate = sub.add_parser(
        "evaluate", parents=[common], help="how well the model does on your labelled images",
        description="Score the images a labels table names (a `path` or `sop_instance_uid` "
        "column, then one column per finding: 1, 0 or empty) and write per finding AUROC "
        "with DeLong's 95 %% interval, prevalence, sensitivity, specificity, PPV and NPV at "
        "the finding's threshold (model.thresholds, else model.threshold), and the threshold "
        "that reaches a target sensitivity or specificity, to OUT/metrics.csv and "
        "OUT/metrics.json, with ROC, calibration and histogram plots in OUT/report.html.")
    evaluate.add_argument("--labels", type=Path, required=True, metavar="LABELS.csv")
    target = evaluate.add_mutually_exclusive_group()
    target.add_argument("--target-sensitivity", type=_threshold, metavar="S",
                        help="propose per finding the threshold that reaches this "
                        "sensitivity (default: 0.9)")
    target.add_argument("--target-specificity", type=_threshold, metavar="S",
                        help="... or this specificity instead")
    evaluate.add_argument("--write-thresholds", action="store_true",
                          help="write the proposed thresholds as a config snippet "
                          "(OUT/thresholds.yaml) and print it")
    evaluate.add_argument("--format", dest="labels_format", default="csv",
                          choices=("csv", "nih", "chexpert"),
                          help="csv: a path (or sop_instance_uid) column and one column per "
                          "finding (1/0/empty); nih: NIH ChestX-ray14's Data_Entry_2017.csv; "
                          "chexpert: CheXpert's train.csv or valid.csv (read by "
                          "TorchXRayVision, as published)")
    evaluate.add_argument("-m", "--model", dest="models", action="append", choices=list(MODELS),
                          metavar="NAME", help="a model to evaluate; repeat it to compare "
                          "several on the same images (default: model.name)")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, metavar="DIR",
                        help="the folder of a dataset's images (default: the label file's)")
    source.add_argument("--from-journal", action="store_true",
                        help="take the scores from the journal (the config's state_dir) for "
                        "images the same model and weights have classified, matched by SOP "
                        "Instance UID or back-filled path; classify the rest")
    evaluate.add_argument("out", type=Path, metavar="OUT")

    check = sub.add_parser("check-config", help="validate a config file and print the "
                           "effective configuration")
    check.add_argument("file", metavar="FILE")

    models = sub.add_parser("models", help="list, fetch, import or export models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_sub.add_parser("list", parents=[common],
                                    help="every supported model and its weights")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--verify", action="store_true",
                         help="load each present weights file to check it")
    fetch = models_sub.add_parser("fetch", parents=[common],
                                  help="download published weights into the weights folder")
    fetch.add_argument("name", choices=list(MODELS), metavar="NAME")
    fetch.add_argument("--url", metavar="BASE_URL",
                       help="download from this mirror instead (default: model.download_url, "
                       "else TorchXRayVision's release page)")
    imp = models_sub.add_parser("import", parents=[common],
                                help="stage a weights file carried in by hand (offline sites)")
    imp.add_argument("name", choices=list(MODELS), metavar="NAME")
    imp.add_argument("file", type=Path, metavar="FILE")
    onnx = models_sub.add_parser(
        "export", parents=[common],
        help="build a model's ONNX Runtime graph ahead of time (checked against PyTorch)",
        description="Export the model to ONNX beside its weights and check its scores against "
        "PyTorch's (within 1e-4), so that the daemon starts on ONNX Runtime without loading "
        "torch, and write its model package (NAME.xrvdmodel: the graph and a manifest), which "
        "is all a service install without PyTorch needs. Prints the package's path.")
    onnx.add_argument("name", choices=list(MODELS), metavar="NAME")
    onnx.add_argument("--force", action="store_true",
                      help="export again even if a verified graph is cached")
    onnx.add_argument("--output", type=Path, metavar="FILE",
                      help="write the model package here (default: installed beside the "
                      "weights as NAME.xrvdmodel)")
    package = models_sub.add_parser(
        "import-package", parents=[common],
        help="install a model package carried in from a full install (service installs)",
        description="Verify a model package written by `xrvd models export` (structure, "
        "sha256, and its graph run on the check input against PyTorch's recorded scores) and "
        "install it beside the weights: a service install without PyTorch scores from it.")
    package.add_argument("file", type=Path, metavar="FILE")

    status = sub.add_parser("status", parents=[common],
                            help="what the journal says: counts, queue, failures (read-only)")
    status.add_argument("--json", action="store_true")
    retry = sub.add_parser("retry", parents=[common],
                           help="put failed studies back into the queue")
    retry.add_argument("--json", action="store_true")
    echo = sub.add_parser("echo", parents=[common],
                          help="C-ECHO a destination from the config, any peer, or (default) "
                          "this xrvd's own listener")
    echo.add_argument("destination", nargs="?", metavar="NAME",
                      help="a destination from the config")
    echo.add_argument("--host", help="default: scp.bind from the config")
    echo.add_argument("--port", type=int, help="default: scp.port from the config")
    echo.add_argument("--called-aet", "-aec", help="default: scp.ae_title from the config")
    echo.add_argument("--calling-aet", "-aet", default="XRVD-ECHO")
    echo.add_argument("--timeout", type=float, default=10.0)
    echo.add_argument("--json", action="store_true")
    sub.add_parser("serve", parents=[common],
                   help="run the daemon: receive, classify, report (until SIGTERM)")
    sub.add_parser("demo", parents=[common],
                   help="classify the bundled sample chest X-ray end to end")
    backfill = sub.add_parser(
        "backfill", parents=[common], help="classify an existing archive (resumable)",
        description="Crawl folders (and DICOMDIR media), or query and retrieve from a PACS "
        "(--source), and run every image through the daemon's stages: journal, selection, "
        "classification, report. Files are read in place, never changed. Interrupt it at any "
        "point and run the same command again to go on.")
    backfill.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                          help="folders, files or DICOMDIR files")
    backfill.add_argument("--source", metavar="NAME",
                          help="a PACS from the config's sources: instead of PATHs")
    backfill.add_argument("-r", "--recursive", action="store_true",
                          help="walk sub-folders too")
    backfill.add_argument("--dry-run", action="store_true",
                          help="show what would be classified (or retrieved) and why the rest "
                          "would not; classify and journal nothing")
    backfill.add_argument("--limit", type=_positive_int, metavar="N",
                          help="take at most N new files from the crawl (with --source: "
                          "retrieve at most N studies)")
    backfill.add_argument("--since", type=_date, metavar="DATE",
                          help="only studies from this date on (YYYY-MM-DD; by StudyDate; with "
                          "--source: default 30 days before --until)")
    backfill.add_argument("--until", type=_date, metavar="DATE",
                          help="with --source: the last study date to query (default: today)")
    backfill.add_argument("--modality", type=_modalities, metavar="CR,DX",
                          help="with --source: the series modalities to retrieve (default: "
                          "the source's modalities)")
    backfill.add_argument("--workers", type=_non_negative_int, metavar="N",
                          help="processes decoding and converting images (default: the cores "
                          "available; 0: in the main process; the local engine's)")
    backfill.add_argument("--engine", choices=("local", "ray"),
                          help="local: on this machine; ray: across a Ray cluster (the ray "
                          "extra; folders only; default: backfill.engine in the config)")
    backfill.add_argument("--address", metavar="ADDRESS",
                          help="with --engine ray: the cluster, auto (RAY_ADDRESS or the one "
                          "`ray start` started here), local (a Ray of its own), HOST:PORT or "
                          "ray://HOST:PORT (default: backfill.ray_address)")
    backfill.add_argument("--actors", type=_non_negative_int, metavar="N",
                          help="with --engine ray: model actors (0: one per node, or as many "
                          "as the GPUs hold; default: backfill.actors)")
    backfill.add_argument("--gpus-per-actor", type=_non_negative_float, metavar="G",
                          help="with --engine ray: GPUs each model actor holds (a fraction "
                          "shares one; 0: CPU; default: backfill.gpus_per_actor)")
    export = sub.add_parser(
        "export", parents=[common], help="write results as CSV, JSON Lines or Parquet",
        description="One row per classified image (its current result): UIDs, view, model, "
        "every label's score and call, timestamps.")
    export.add_argument("out", metavar="OUT", help="output file ('-': stdout, csv/jsonl only)")
    export.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                        help="default: from OUT's extension, else csv")
    export.add_argument("--since", type=_date, metavar="DATE",
                        help="only images classified on or after this date (YYYY-MM-DD)")
    export.add_argument("-m", "--model", choices=list(MODELS), metavar="NAME",
                        help="only this model's results")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"xrvd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except XrvdError as exc:
        print(f"xrvd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("xrvd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `xrvd export - | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    from . import log
    from .config import load_config

    if args.command == "check-config":
        from .pipeline.models import install_kind
        from .pipeline.package import package_path
        from .pipeline.registry import get_spec
        from .pipeline.weights import weights_path

        config = load_config(args.file)
        kind, can = install_kind()
        spec = get_spec(config.model.name)
        found = [f"{what} {path}" for what, path in (
            ("model package", package_path(spec, config.weights_dir)),
            ("weights", weights_path(spec, config.weights_dir))) if path.is_file()]
        print(f"# install: {kind} ({can})")
        print(f"# model {spec.name}: " + (", ".join(found) if found else
                                          f"nothing installed in {config.weights_dir} yet"))
        print(f"# {args.file}: valid. Effective configuration (defaults filled in):")
        print(config.to_yaml(), end="")
        return EXIT_OK

    config = load_config(args.config)
    if args.command == "serve":
        from .commands.serve import serve

        return serve(config, args.config)
    log.configure(args.log_level or "warning", "console", stream="stderr",
                  include_patient_identifiers=config.log.include_patient_identifiers,
                  salt=log.load_salt(config.state_dir, create=False))
    if args.command == "classify":
        return _classify(args, config)
    if args.command == "evaluate":
        from .commands.evaluate import Target, evaluate

        target = (Target("specificity", args.target_specificity)
                  if args.target_specificity is not None
                  else Target("sensitivity", 0.9 if args.target_sensitivity is None
                              else args.target_sensitivity))
        return evaluate(config, args.labels, args.out, models=tuple(args.models or ()),
                        target=target, kind=args.labels_format, images=args.images,
                        from_journal=args.from_journal,
                        write_thresholds=args.write_thresholds)
    if args.command in ("status", "retry", "echo"):
        return _ops(args, config)
    if args.command == "demo":
        from .commands.demo import run_demo

        return run_demo(config)
    if args.command == "backfill":
        return _backfill(args, config)
    if args.command == "export":
        return _export(args, config)
    return _models(args, config)


def _classify(args: argparse.Namespace, config) -> int:
    from .commands.classify import classify_files, render
    from .pipeline.convert import ConvertOptions
    from .pipeline.models import Classifier
    from .thresholds import Thresholds

    classifier = Classifier.from_config(config, name=args.model, weights_dir=args.weights_dir)
    threshold = (Thresholds.of_config(config.model, classifier.labels)
                 if args.threshold is None else Thresholds(args.threshold))
    results = classify_files(
        args.files, classifier, threshold=threshold,
        batch_size=args.batch_size or config.model.batch_size,
        options=ConvertOptions(**config.convert.model_dump()))
    sys.stdout.write(render(results, classifier.identity, threshold, args.format))
    if not sys.stdout.isatty() or args.format != "table":
        sys.stdout.flush()
    failed = [r for r in results if r.error is not None]
    if failed:
        print(f"xrvd: {len(failed)} of {len(results)} file(s) could not be classified",
              file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def _backfill(args: argparse.Namespace, config) -> int:
    from .commands.backfill import BackfillRequest, run_backfill
    from .cpus import available_cpus

    workers = available_cpus() if args.workers is None else args.workers
    config = _backfill_engine(args, config)
    if args.source is not None:
        if config.backfill.engine == "ray":
            print("xrvd backfill: --source retrieves and classifies on this machine; the Ray "
                  "engine back-fills folders (run it with --engine local)", file=sys.stderr)
            return EXIT_ERROR
        return _backfill_source(args, config, workers)
    if not args.paths:
        print("xrvd backfill: give folders or files to crawl, or --source NAME to query a "
              "PACS from the config's sources", file=sys.stderr)
        return EXIT_ERROR
    if args.until is not None or args.modality is not None:
        print("xrvd backfill: --until and --modality go with --source", file=sys.stderr)
        return EXIT_ERROR
    request = BackfillRequest(
        paths=tuple(args.paths), recursive=args.recursive, dry_run=args.dry_run,
        limit=args.limit, since=args.since, workers=workers)
    return run_backfill(config, request, args.log_level)


def _backfill_engine(args: argparse.Namespace, config):
    """The config with the command line's --engine, --address, --actors and --gpus-per-actor
    in its backfill section (checked as the config's keys are)."""
    from .config import validate_config

    given = {"engine": args.engine, "ray_address": args.address, "actors": args.actors,
             "gpus_per_actor": args.gpus_per_actor}
    given = {key: value for key, value in given.items() if value is not None}
    if not given:
        return config
    settings = validate_config({"backfill": {**config.backfill.model_dump(), **given}},
                               "the command line").backfill
    return config.model_copy(update={"backfill": settings})


def _backfill_source(args: argparse.Namespace, config, workers: int) -> int:
    import datetime as dt

    from .commands.backfill_source import SourceRequest, run_source_backfill

    if args.paths or args.recursive:
        print("xrvd backfill: --source queries a PACS; give no PATHs with it", file=sys.stderr)
        return EXIT_ERROR
    until = args.until or dt.date.today()
    since = args.since or until - dt.timedelta(days=30)
    if since > until:
        print(f"xrvd backfill: --since {since} is after --until {until}", file=sys.stderr)
        return EXIT_ERROR
    config.source(args.source)  # an unknown name is a config error, said as such
    request = SourceRequest(source=args.source, since=since, until=until,
                            modalities=args.modality or (), limit=args.limit,
                            dry_run=args.dry_run, workers=workers)
    return run_source_backfill(config, request, args.log_level)


def _export(args: argparse.Namespace, config) -> int:
    from .commands.export import export
    from .config import FINDING_NAMES
    from .thresholds import Thresholds

    fmt = args.format or {".jsonl": "jsonl", ".parquet": "parquet"}.get(
        Path(args.out).suffix.lower(), "csv")
    count = export(config.state_dir, args.out, fmt, since=args.since, model=args.model,
                   configured=Thresholds.of_config(config.model, FINDING_NAMES))
    print(f"xrvd: exported {count} classified image(s) to {args.out} ({fmt})", file=sys.stderr)
    return EXIT_OK


def _ops(args: argparse.Namespace, config) -> int:
    from .commands import ops

    if args.command == "status":
        print(ops.status(config, args.json))
        return EXIT_OK
    if args.command == "retry":
        print(ops.retry(config, args.json))
        return EXIT_OK
    if args.destination:
        from .deliver import tls_arguments

        peer = config.destination(args.destination)
        if peer.type == "dicomweb":
            print(f"xrvd echo: {args.destination} is a DICOMweb destination ({peer.url}); "
                  "C-ECHO is for DICOM peers", file=sys.stderr)
            return EXIT_ERROR
        code, text = ops.echo(peer.host, peer.port, peer.ae_title, peer.calling_aet,
                              args.timeout, args.json, tls_arguments(peer))
    else:
        code, text = ops.echo(args.host or config.scp.bind, args.port or config.scp.port,
                              args.called_aet or config.scp.ae_title, args.calling_aet,
                              args.timeout, args.json)
    print(text)
    return code


def _models(args: argparse.Namespace, config) -> int:
    from .commands import models as modeladmin

    if args.models_command == "list":
        rows = modeladmin.list_models(config.weights_dir, verify=args.verify,
                                      state_dir=config.state_dir)
        print(modeladmin.render_list(rows, config.weights_dir, args.json))
        return EXIT_OK
    if args.models_command == "fetch":
        path = modeladmin.fetch(args.name, config.weights_dir,
                                args.url or config.model.download_url,
                                state_dir=config.state_dir)
        print(f"{args.name}: weights verified and installed at {path}")
        return EXIT_OK
    if args.models_command == "export":
        record = modeladmin.export(args.name, config.weights_dir, threads=config.model.threads,
                                   force=args.force, state_dir=config.state_dir,
                                   output=args.output)
        print(f"{args.name}: ONNX graph verified against PyTorch (max abs diff "
              f"{record['max_abs_diff']:.1e}) at {record['path']}; model package (sha256 "
              f"{record['package_sha256'][:16]}...) at:", file=sys.stderr)
        print(record["package"])
        return EXIT_OK
    if args.models_command == "import-package":
        path, manifest = modeladmin.import_package(args.file, config.weights_dir,
                                                   threads=config.model.threads,
                                                   state_dir=config.state_dir)
        print(f"{manifest['model']}: model package verified (weights sha256 "
              f"{manifest['weights_sha256'][:16]}..., exported with "
              f"{manifest.get('exporter', 'an unnamed exporter')}) "
              f"and installed at {path}")
        return EXIT_OK
    path = modeladmin.import_weights(args.name, args.file, config.weights_dir,
                                     state_dir=config.state_dir)
    print(f"{args.name}: weights verified and installed at {path}")
    return EXIT_OK
