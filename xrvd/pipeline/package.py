"""Model packages: everything a service install needs to score a model without torch or
TorchXRayVision, in one file a site can build on a full install and carry into an air-gapped
network (`xrvd models export NAME`, then `xrvd models import-package FILE`).

`<model>.xrvdmodel` is a zip archive of two stored (uncompressed) members:
- `model.onnx`: the graph of `network(x)`, exactly as onnxrt.py exports and checks it;
- `manifest.json`: the model, the labels it reports (output index and operating point), its
  input size, the weights' file name and sha256, the untrained marker, the exporter and library
  versions, the graph's sha256 and size, and the equivalence check: PyTorch's scores on
  onnxrt.check_input and how far the graph's were from them when it was exported; where the
  graph has class activation maps (`"maps": true`, cam.py), PyTorch's maps on the same input
  too (float32, base64). A package without `"maps": true` (one exported before xrvd made
  heatmaps) scores as before and has no heatmaps.

A package is verified every time it is loaded, before it scores anything: its size is bounded
before it is read, the archive holds those two members and nothing else, the manifest agrees
with xrvd's registry for the model (labels, indices, operating points, resolution), the graph
matches its sha256, and the graph, run here, gives PyTorch's recorded scores within
onnxrt.TOLERANCE (the bound is xrvd's, not the manifest's), and its recorded maps within
onnxrt.maps_tolerance. With the state directory's record
(trust.TrustedHashes), the package file must also be the one that was exported or imported.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from ..fsutil import write_atomically_readable
from . import onnxrt
from .registry import ModelSpec
from .trust import TrustedHashes

SUFFIX = ".xrvdmodel"
FORMAT = 1
KIND = "xrvd model package"
MANIFEST, GRAPH = "manifest.json", "model.onnx"
MAX_MANIFEST_BYTES = 1 << 20
MAX_GRAPH_BYTES = 1 << 30  # ResNet-50's graph is about 95 MB
MAX_PACKAGE_BYTES = MAX_GRAPH_BYTES + MAX_MANIFEST_BYTES + (1 << 16)  # + the zip's own records


class PackageError(WeightsError):
    """A model package that cannot be used: damaged, for another model, or not reproducing
    its recorded scores."""

    reason = "package_invalid"


@dataclass(frozen=True)
class Package:
    path: Path
    sha256: str  # of the package file
    manifest: dict
    graph: bytes  # the bytes that were checked: the bytes that run

    @property
    def weights_sha256(self) -> str:
        return self.manifest["weights_sha256"]


def package_path(spec: ModelSpec, weights_dir: Path) -> Path:
    """Where an installed package of `spec` lives."""
    return Path(weights_dir) / f"{spec.name}{SUFFIX}"


def labels_of(spec: ModelSpec) -> list[dict]:
    return [{"name": label.name, "index": label.index,
             "operating_point": label.operating_point} for label in spec.labels]


# --- writing -------------------------------------------------------------------------------


def build_manifest(spec: ModelSpec, graph: bytes, *, weights_sha256: str,
                   untrained: str | None, torchxrayvision_version: str,
                   reference: np.ndarray, difference: float,
                   maps_reference: np.ndarray | None = None) -> dict:
    """maps_reference: PyTorch's maps on the check input (cam.torch_scores_and_maps), for a
    graph whose maps were checked at export (its sidecar's `"maps": true`); without it the
    package has no heatmaps. The graph is run here to record how far its maps are from them;
    raises PackageError if they are further than onnxrt.maps_tolerance."""
    from .. import __version__

    maps_check = {}
    if maps_reference is not None:
        reference_maps = np.asarray(maps_reference, dtype="<f4")
        maps = onnxrt.Runner(graph, spec, threads=1).run_with_maps(
            onnxrt.check_input(spec.resolution, len(reference_maps)))[1]
        maps_difference = _maps_difference(maps, reference_maps, spec.name)
        maps_check = {
            "pytorch_maps": {"shape": list(reference_maps.shape), "float32_le_base64":
                             base64.b64encode(reference_maps.tobytes()).decode("ascii")},
            "maps_max_abs_diff": maps_difference,
            "maps_tolerance": onnxrt.maps_tolerance(reference_maps),
        }
    return {
        "format": FORMAT,
        "kind": KIND,
        "model": spec.name,
        "architecture": spec.architecture,
        "resolution": spec.resolution,
        "labels": labels_of(spec),
        "weights_file": spec.weights_file,
        "weights_sha256": weights_sha256,
        "untrained": untrained,
        "torchxrayvision_version": torchxrayvision_version,
        "exporter": onnxrt.exporter_version(),
        "xrvd_version": __version__,
        "onnx_sha256": hashlib.sha256(graph).hexdigest(),
        "onnx_size": len(graph),
        "maps": bool(maps_check),
        "check": {
            "input": f"onnxrt.check_input({spec.resolution}, {len(reference)})",
            "pytorch_scores": reference.astype(float).tolist(),
            "max_abs_diff": difference,
            "tolerance": onnxrt.TOLERANCE,
            **maps_check,
        },
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def encode(manifest: dict, graph: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=2))
        archive.writestr(GRAPH, graph)
    return buffer.getvalue()


def write(target: Path, manifest: dict, graph: bytes) -> str:
    """Write a package atomically; its sha256."""
    data = encode(manifest, graph)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically_readable(target, data)
    return hashlib.sha256(data).hexdigest()


# --- reading and verifying -----------------------------------------------------------------


def read(path: Path) -> Package:
    """The package at `path`, its structure and manifest checked (not yet run: see verify)."""
    return parse(path, read_bounded(path))


def read_bounded(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PACKAGE_BYTES + 1)
    except OSError as exc:
        raise PackageError(f"cannot read the model package {path}: "
                           f"{exc.strerror or exc}") from exc
    if len(data) > MAX_PACKAGE_BYTES:
        raise PackageError(f"{path} is larger than any model package ({MAX_PACKAGE_BYTES} "
                           "bytes): not a package xrvd wrote")
    return data


def parse(path: Path, data: bytes) -> Package:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {info.filename: info for info in archive.infolist()}
        if set(members) != {MANIFEST, GRAPH}:
            raise PackageError(f"{path} holds {sorted(members)[:5]}, not exactly {MANIFEST} "
                               f"and {GRAPH}: not a model package")
        for info, bound in ((members[MANIFEST], MAX_MANIFEST_BYTES),
                            (members[GRAPH], MAX_GRAPH_BYTES)):
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > bound:
                raise PackageError(f"{path}: {info.filename} is compressed or larger than "
                                   f"{bound} bytes: not a package xrvd wrote")
        manifest = json.loads(archive.read(MANIFEST).decode("utf-8"))
        graph = archive.read(GRAPH)
    except PackageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, UnicodeDecodeError,
            EOFError) as exc:
        raise PackageError(f"{path} is not a readable model package ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); export it again with `xrvd models export`") \
            from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            manifest.get("kind") != KIND:
        raise PackageError(f"{path}: its manifest is not a format-{FORMAT} xrvd model package "
                           "manifest; export it again with this version of xrvd")
    if manifest.get("onnx_size") != len(graph) or \
            manifest.get("onnx_sha256") != hashlib.sha256(graph).hexdigest():
        raise PackageError(f"{path}: the graph does not match the sha256 in its manifest "
                           "(damaged in transit?); copy or export it again")
    return Package(Path(path), hashlib.sha256(data).hexdigest(), manifest, graph)


def check_against(package: Package, spec: ModelSpec) -> None:
    """The manifest describes `spec` as xrvd's registry knows it."""
    manifest, path = package.manifest, package.path
    problems = []
    if manifest.get("model") != spec.name:
        problems.append(f"it is a package of {manifest.get('model')!r}")
    if manifest.get("resolution") != spec.resolution:
        problems.append(f"its input is {manifest.get('resolution')} px, not {spec.resolution}")
    if manifest.get("labels") != labels_of(spec):
        problems.append("its labels, output indices or operating points differ from xrvd's "
                        "registry")
    if not isinstance(manifest.get("weights_sha256"), str) or \
            not isinstance(manifest.get("torchxrayvision_version"), str):
        problems.append("its manifest lacks the weights' sha256 or TorchXRayVision's version")
    check = manifest.get("check")
    scores = check.get("pytorch_scores") if isinstance(check, dict) else None
    if not isinstance(scores, list) or len(scores) != onnxrt.CHECK_BATCH or not all(
            isinstance(row, list) and row and len(row) == len(scores[0])
            and all(isinstance(v, (int, float)) for v in row) for row in scores):
        problems.append(f"its manifest lacks PyTorch's scores on the check input "
                        f"({onnxrt.CHECK_BATCH} rows of equal length)")
    if manifest.get("maps") is True and not isinstance(recorded_maps(manifest), np.ndarray):
        problems.append("its manifest says it has maps but lacks PyTorch's maps on the check "
                        f"input ({onnxrt.CHECK_BATCH} images)")
    if problems:
        raise PackageError(f"{path} cannot serve {spec.name}: {'; '.join(problems)}. Export "
                           f"the package again with `xrvd models export {spec.name}`")


def recorded_maps(manifest: dict) -> np.ndarray | None:
    """PyTorch's maps on the check input as the manifest records them; None if they are not
    there whole (CHECK_BATCH images, one map per output of the recorded scores)."""
    check = manifest.get("check")
    entry = check.get("pytorch_maps") if isinstance(check, dict) else None
    try:
        shape = tuple(entry["shape"])
        maps = np.frombuffer(base64.b64decode(entry["float32_le_base64"], validate=True),
                             dtype="<f4").reshape(shape)
        outputs = len(check["pytorch_scores"][0])
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    return maps if len(shape) == 4 and shape[:2] == (onnxrt.CHECK_BATCH, outputs) else None


def _maps_difference(maps: np.ndarray, reference: np.ndarray, where: object) -> float:
    difference = onnxrt.max_abs_diff(maps, reference)
    bound = onnxrt.maps_tolerance(reference)
    if not difference <= bound:
        shown = "an unbounded amount" if not math.isfinite(difference) else f"{difference:.2e}"
        raise PackageError(f"{where}: its graph's maps on the check input differ from "
                           f"PyTorch's by {shown} (more than {bound:.2e})")
    return difference


def verify(package: Package, spec: ModelSpec, *, threads: int,
           device: str = "cpu") -> onnxrt.Runner:
    """A runner on the package's graph, once it has reproduced PyTorch's recorded scores on
    the check input here (within xrvd's tolerance, whatever the manifest says)."""
    check_against(package, spec)
    reference = np.asarray(package.manifest["check"]["pytorch_scores"], dtype=np.float64)
    maps = package.manifest.get("maps") is True
    try:
        runner = onnxrt.Runner(package.graph, spec, threads=threads, device=device, maps=maps)
        batch = onnxrt.check_input(spec.resolution, len(reference))
        if maps and not runner.has_maps:
            raise PackageError(f"{package.path}: its manifest says the graph has maps, but "
                               "the graph has no `maps` output")
        if maps:
            scores, graph_maps = runner.run_with_maps(batch)
        else:
            scores = runner.run(batch)
    except PackageError:
        raise
    except Exception as exc:  # the bytes matched their sha256, but do not run
        raise PackageError(f"{package.path}: its graph does not run here "
                           f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    difference = onnxrt.max_abs_diff(scores, reference)
    if not difference <= onnxrt.TOLERANCE:
        shown = "an unbounded amount" if not math.isfinite(difference) else f"{difference:.2e}"
        raise PackageError(f"{package.path}: its graph's scores on the check input differ from "
                           f"PyTorch's recorded ones by {shown} (more than "
                           f"{onnxrt.TOLERANCE}); it is not the model it claims to be")
    if maps:
        _maps_difference(graph_maps, recorded_maps(package.manifest),
                         f"{package.path} is not the model it claims to be")
    return runner


def check_recorded(package: Package, trusted: TrustedHashes | None, log) -> None:
    """The package file is the one exported or imported here (refused if it changed since);
    one with no record yet is recorded on first use, as weights are."""
    if trusted is None:
        return
    entry = trusted.entry(package.path)
    if entry is None:
        try:
            trusted.record(package.path, package.sha256, "first use")
        except OSError as exc:
            log.warning("package.not_recorded", path=str(package.path),
                        record=str(trusted.path), error=exc.strerror or str(exc))
            return
        log.warning("package.recorded", path=str(package.path), sha256=package.sha256,
                    source="first use", record=str(trusted.path),
                    detail="no record of this model package (put in place by hand): it is "
                    "trusted as it is now, and refused if it changes")
        return
    if entry["sha256"] != package.sha256:
        raise PackageError(
            f"{package.path} is not the package that was installed: its sha256 is "
            f"{package.sha256[:16]}..., the record in {trusted.path} says "
            f"{entry['sha256'][:16]}.... If you replaced it on purpose, install it with "
            "`xrvd models import-package FILE`")


def install(source: Path, spec_of, weights_dir: Path, *, threads: int,
            trusted: TrustedHashes | None) -> tuple[Path, Package]:
    """`xrvd models import-package`: verify a package carried in (run included), then put it
    in place for its model and record it. spec_of: model name -> ModelSpec (raises for a
    model xrvd does not know)."""
    data = read_bounded(source)
    found = parse(source, data)
    spec = spec_of(str(found.manifest.get("model")))
    verify(found, spec, threads=threads)
    target = package_path(spec, weights_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically_readable(target, data)
    if trusted is not None:
        trusted.record(target, found.sha256, "package import",
                       weights_sha256=found.weights_sha256)
    return target, Package(target, found.sha256, found.manifest, found.graph)
