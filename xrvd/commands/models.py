"""`xrvd models list|fetch|import|export`: what is installed, getting weights in place, and
building the ONNX Runtime graphs ahead of time.

`state_dir` is where the record of installed weights and exported graphs lives
(trust.TrustedHashes): `fetch` and `import` record what they install, `export` records the
graph it builds and refuses weights that differ from their record, `list --verify` reports
them."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import WeightsChangedError, WeightsError, WeightsUnsafeError
from ..pipeline import trust, weights
from ..pipeline.registry import MODELS, get_spec


def _trusted(state_dir: Path | None) -> trust.TrustedHashes | None:
    return None if state_dir is None else trust.TrustedHashes(state_dir)


def list_models(weights_dir: Path, *, verify: bool = False,
                state_dir: Path | None = None) -> list[dict]:
    trusted = _trusted(state_dir)
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


def fetch(name: str, weights_dir: Path, base_url: str | None, *,
          state_dir: Path | None = None) -> Path:
    return weights.fetch(get_spec(name), weights_dir, base_url=base_url,
                         trusted=_trusted(state_dir))


def import_weights(name: str, source: Path, weights_dir: Path, *,
                   state_dir: Path | None = None) -> Path:
    return weights.import_file(get_spec(name), source, weights_dir,
                               trusted=_trusted(state_dir))


def export(name: str, weights_dir: Path, *, threads: int = 0, force: bool = False,
           state_dir: Path | None = None) -> dict:
    """Build (or find) the verified ONNX graph of a model; its sidecar record plus `path`.

    Untrained weights are exported only where running them is allowed (see untrained.py)."""
    from ..cpus import available_cpus
    from ..pipeline import onnxrt
    from ..pipeline.models import refuse_untrained
    from ..pipeline.untrained import untrained_allowed_by_environment

    spec = get_spec(name)
    trusted = _trusted(state_dir)
    path = weights.require(spec, weights_dir)
    checked = trust.check_recorded(spec, path, trusted)
    digest = checked.sha256
    cached = onnxrt.check_cache(spec, path.parent, digest, trusted=trusted)
    allowed = untrained_allowed_by_environment()
    if cached.status == "verified" and not force:
        refuse_untrained(spec, path, cached.record.get("untrained"), allowed)
        trust.record_first_use(spec, checked, trusted)
        return {**cached.record, "path": str(cached.path)}
    loaded = weights.load_network(spec, path, expected_sha256=digest)
    refuse_untrained(spec, path, loaded.untrained, allowed)
    trust.record_first_use(spec, checked, trusted)
    built = onnxrt.build(spec, loaded.network, weights_path=path, weights_sha256=digest,
                         untrained=loaded.untrained, threads=threads or available_cpus(),
                         trusted=trusted)
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
