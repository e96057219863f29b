"""`xrvd models list|fetch|import|export`: what is installed, getting weights in place, and
building the ONNX Runtime graphs ahead of time."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import WeightsError
from .pipeline import weights
from .pipeline.registry import MODELS, get_spec


def list_models(weights_dir: Path, *, verify: bool = False) -> list[dict]:
    rows = []
    for spec in MODELS.values():
        path = weights.weights_path(spec, weights_dir)
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
        }
        if verify and present:
            try:
                loaded = weights.load_network(spec, path)
                row["status"] = "untrained" if loaded.untrained else "ok"
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
             f"{'MODEL':<{name_w}}  {'ARCHITECTURE':<{arch_w}}  RES  LABELS  WEIGHTS"]
    for r in rows:
        if r["present"]:
            state = f"{r['status'].split(':')[0]} ({r['size_bytes'] / 1e6:.1f} MB)"
        else:
            state = f"missing ({r['weights_file']})"
        lines.append(f"{r['name']:<{name_w}}  {r['architecture']:<{arch_w}}  "
                     f"{r['resolution']:>3}  {len(r['labels']):>6}  {state}")
    missing = [r["name"] for r in rows if not r["present"]]
    if missing:
        lines.append("")
        lines.append("Get missing weights with `xrvd models fetch NAME`, or offline with "
                     "`xrvd models import NAME FILE`.")
    return "\n".join(lines)


def fetch(name: str, weights_dir: Path, base_url: str | None) -> Path:
    return weights.fetch(get_spec(name), weights_dir, base_url=base_url)


def import_weights(name: str, source: Path, weights_dir: Path) -> Path:
    return weights.import_file(get_spec(name), source, weights_dir)


def export(name: str, weights_dir: Path, *, threads: int = 0, force: bool = False) -> dict:
    """Build (or find) the verified ONNX graph of a model; its sidecar record plus `path`.

    Untrained weights are exported only where running them is allowed (see untrained.py)."""
    from .pipeline import onnxrt
    from .pipeline.models import available_cpus, refuse_untrained
    from .pipeline.untrained import untrained_allowed_by_environment

    spec = get_spec(name)
    path = weights.require(spec, weights_dir)
    digest = weights.sha256(path)
    cached = onnxrt.check_cache(spec, path.parent, digest)
    allowed = untrained_allowed_by_environment()
    if cached.status == "verified" and not force:
        refuse_untrained(spec, path, cached.record.get("untrained"), allowed)
        return {**cached.record, "path": str(cached.path)}
    loaded = weights.load_network(spec, path)
    refuse_untrained(spec, path, loaded.untrained, allowed)
    built = onnxrt.build(spec, loaded.network, weights_path=path, weights_sha256=digest,
                         untrained=loaded.untrained, threads=threads or available_cpus())
    if not built.verified:
        difference = built.record["max_abs_diff"]
        raise onnxrt.ExportError(
            f"{name}: the ONNX graph's scores differ from PyTorch's by "
            f"{'an unbounded amount' if difference is None else f'{difference:.2e}'} (more than "
            f"{onnxrt.TOLERANCE}); xrvd runs this model with PyTorch (model.backend: torch)")
    if built.path is None:
        raise onnxrt.ExportError(f"{name}: cannot write the ONNX graph into {path.parent}; "
                                 "make the weights folder writable and run this again")
    return {**built.record, "path": str(built.path)}
