"""`xrvd models list|fetch|import|export|import-package`: what is installed, getting weights
in place, building the ONNX Runtime graphs ahead of time, and the model packages a service
install scores from without PyTorch (pipeline/package.py).

`state_dir` is where the record of installed weights and exported graphs lives
(trust.TrustedHashes): `fetch` and `import` record what they install, `export` records the
graph it builds and refuses weights that differ from their record, `list --verify` reports
them."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import WeightsChangedError, WeightsError, WeightsUnsafeError
from ..log import get_logger
from ..pipeline import package, trust, weights
from ..pipeline.registry import MODELS, get_spec


def _trusted(state_dir: Path | None) -> trust.TrustedHashes | None:
    return None if state_dir is None else trust.TrustedHashes(state_dir)


def list_models(weights_dir: Path, *, verify: bool = False,
                state_dir: Path | None = None) -> list[dict]:
    from ..pipeline.models import torch_installed

    trusted = _trusted(state_dir)
    rows = []
    for spec in MODELS.values():
        path = weights.weights_path(spec, weights_dir)
        packaged = package.package_path(spec, weights_dir)
        present = path.is_file()
        row = {
            "name": spec.name,
            "architecture": spec.architecture,
            "resolution": spec.resolution,
            "labels": list(spec.label_names),
            "trained_on": spec.trained_on,
            "weights_file": spec.weights_file,
            "weights_path": str(path),
            "present": present,
            "size_bytes": path.stat().st_size if present else None,
            "package": str(packaged) if packaged.is_file() else None,
            # output.heatmaps: None where the model has class activation maps, else why not
            "heatmaps_unsupported": spec.maps_unsupported,
        }
        if verify and present and not torch_installed():
            row["status"] = "ok (not verified: loading weights needs PyTorch, and this is a " \
                "service install)"
        elif verify and present:
            try:
                checked = trust.check_recorded(spec, path, trusted)
                loaded = weights.load_network(spec, path, expected_sha256=checked.sha256)
                row["status"] = "untrained" if loaded.untrained else "ok"
                row["recorded"] = checked.recorded
            except WeightsChangedError as exc:
                row["status"] = f"changed: {exc}"
            except WeightsUnsafeError as exc:
                row["status"] = f"unsafe: {exc}"
            except WeightsError as exc:
                row["status"] = f"corrupt: {exc}"
        else:
            row["status"] = "ok" if present else "missing"
        rows.append(row)
    return rows


def render_list(rows: list[dict], weights_dir: Path, as_json: bool) -> str:
    if as_json:
        return json.dumps({"weights_dir": str(weights_dir), "models": rows}, indent=2)
    name_w = max(len(r["name"]) for r in rows)
    arch_w = max(len(r["architecture"]) for r in rows)
    lines = [f"weights folder: {weights_dir}",
             f"{'MODEL':<{name_w}}  {'ARCHITECTURE':<{arch_w}}  RES  LABELS  MAPS  WEIGHTS"]
    for r in rows:
        if r["present"]:
            state = f"{r['status'].split(':')[0]} ({r['size_bytes'] / 1e6:.1f} MB)"
        else:
            state = f"missing ({r['weights_file']})"
        if r["package"]:
            state += f"; model package {Path(r['package']).name}"
        maps = "no" if r["heatmaps_unsupported"] else "yes"
        lines.append(f"{r['name']:<{name_w}}  {r['architecture']:<{arch_w}}  "
                     f"{r['resolution']:>3}  {len(r['labels']):>6}  {maps:<4}  {state}")
    if any(r["heatmaps_unsupported"] for r in rows):
        lines.append("")
        lines.append("MAPS: heatmaps (output.heatmaps). " + " ".join(
            f"{r['name']}: {r['heatmaps_unsupported']}." for r in rows
            if r["heatmaps_unsupported"]))
    missing = [r["name"] for r in rows if not r["present"] and not r["package"]]
    if missing:
        lines.append("")
        lines.append("Get missing weights with `xrvd models fetch NAME`, or offline with "
                     "`xrvd models import NAME FILE`.")
    return "\n".join(lines)


def _full_install_only(command: str) -> None:
    """Weights are checked by loading them with PyTorch, and packages are made from them."""
    from ..pipeline.models import torch_installed

    if not torch_installed():
        raise WeightsError(f"`xrvd models {command}` needs PyTorch, which this service install "
                           "does not have: run it on a full install (`uv sync --locked`) and "
                           "bring the model package here with `xrvd models import-package`")


def fetch(name: str, weights_dir: Path, base_url: str | None, *,
          state_dir: Path | None = None) -> Path:
    _full_install_only("fetch")
    return weights.fetch(get_spec(name), weights_dir, base_url=base_url,
                         trusted=_trusted(state_dir))


def import_weights(name: str, source: Path, weights_dir: Path, *,
                   state_dir: Path | None = None) -> Path:
    _full_install_only("import")
    return weights.import_file(get_spec(name), source, weights_dir,
                               trusted=_trusted(state_dir))


def export(name: str, weights_dir: Path, *, threads: int = 0, force: bool = False,
           state_dir: Path | None = None, output: Path | None = None) -> dict:
    """Build (or find) the verified ONNX graph of a model and write its model package (to
    `output`, or installed beside the weights); the graph's sidecar record plus `path` (the
    graph), `package` and `package_sha256`.

    Untrained weights are exported only where running them is allowed (see untrained.py)."""
    from ..cpus import available_cpus
    from ..pipeline import onnxrt
    from ..pipeline.models import refuse_untrained
    from ..pipeline.untrained import untrained_allowed_by_environment

    _full_install_only("export")
    spec = get_spec(name)
    threads = threads or available_cpus()
    trusted = _trusted(state_dir)
    path = weights.require(spec, weights_dir)
    checked = trust.check_recorded(spec, path, trusted)
    digest = checked.sha256
    cached = onnxrt.check_cache(spec, path.parent, digest, trusted=trusted)
    allowed = untrained_allowed_by_environment()
    if cached.status == "verified" and not force:
        refuse_untrained(spec, path, cached.record.get("untrained"), allowed)
        loaded = weights.load_network(spec, path, expected_sha256=digest)
        trust.record_first_use(spec, checked, trusted)
        record, graph, graph_path = cached.record, cached.graph, cached.path
    else:
        loaded = weights.load_network(spec, path, expected_sha256=digest)
        refuse_untrained(spec, path, loaded.untrained, allowed)
        trust.record_first_use(spec, checked, trusted)
        built = onnxrt.build(spec, loaded.network, weights_path=path, weights_sha256=digest,
                             untrained=loaded.untrained, threads=threads, trusted=trusted)
        if not built.verified:
            difference = built.record["max_abs_diff"]
            raise onnxrt.ExportError(
                f"{name}: the ONNX graph's scores differ from PyTorch's by "
                f"{'an unbounded amount' if difference is None else f'{difference:.2e}'} (more "
                f"than {onnxrt.TOLERANCE}); xrvd runs this model with PyTorch (model.backend: "
                "torch), and no model package can be made of it")
        if built.path is None:
            raise onnxrt.ExportError(f"{name}: cannot write the ONNX graph into {path.parent}; "
                                     "make the weights folder writable and run this again")
        record, graph_path = built.record, built.path
        graph = graph_path.read_bytes()
    target, package_sha256 = _write_package(spec, loaded.network, graph, record, threads,
                                            output or package.package_path(spec, weights_dir),
                                            trusted)
    return {**record, "path": str(graph_path), "package": str(target),
            "package_sha256": package_sha256}


def _write_package(spec, network, graph: bytes, record: dict, threads: int, target: Path,
                   trusted: trust.TrustedHashes | None) -> tuple[Path, str]:
    """The package of a verified graph, with PyTorch's scores (and maps) on the check input
    (run again here: the sidecar keeps only their difference)."""
    from ..pipeline import onnxrt

    batch = onnxrt.check_input(spec.resolution)
    reference = onnxrt.torch_scores(network, batch)
    difference = onnxrt.max_abs_diff(
        onnxrt.Runner(graph, spec, threads=threads).run(batch), reference)
    if not difference <= onnxrt.TOLERANCE:
        raise onnxrt.ExportError(f"{spec.name}: the graph's scores differ from PyTorch's by "
                                 f"{difference:.2e}; export again with --force")
    maps_reference = None
    if record.get("maps"):  # the graph's maps were checked at export: the package keeps them
        from ..pipeline.cam import torch_scores_and_maps

        maps_reference = torch_scores_and_maps(network, batch)[1]
    manifest = package.build_manifest(
        spec, graph, weights_sha256=record["weights_sha256"], untrained=record.get("untrained"),
        torchxrayvision_version=record["torchxrayvision_version"], reference=reference,
        difference=difference, maps_reference=maps_reference)
    digest = package.write(target, manifest, graph)
    if trusted is not None:
        try:
            trusted.record(target, digest, "export", weights_sha256=record["weights_sha256"])
        except OSError as exc:  # the package is whole; it is recorded where it is imported
            get_logger(model=spec.name).warning(
                "package.not_recorded", path=str(target), record=str(trusted.path),
                error=exc.strerror or str(exc))
    return target, digest


def import_package(source: Path, weights_dir: Path, *, threads: int = 0,
                   state_dir: Path | None = None) -> tuple[Path, dict]:
    """Verify a model package (its graph run on the check input) and install it beside the
    weights; its installed path and manifest."""
    from ..cpus import available_cpus

    target, found = package.install(source, get_spec, weights_dir,
                                    threads=threads or available_cpus(),
                                    trusted=_trusted(state_dir))
    return target, found.manifest
