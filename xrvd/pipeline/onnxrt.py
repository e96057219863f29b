"""The ONNX Runtime backend: export a loaded TorchXRayVision network to ONNX once, check it
against PyTorch, cache it beside the weights, and run it without torch.

The graph is exactly what `network(x)` computes for xrvd's inputs, sigmoid and
operating-point normalisation included, so its scores mean the same as PyTorch's. Inputs are
(N, 1, R, R) float32 in [-1024, 1024] at the model's native resolution; N is a dynamic axis.
For an architecture with class activation maps (cam.py) the graph has a second output, `maps`
(N, outputs, h, w), checked against PyTorch too. Scoring fetches `scores` alone; ONNX Runtime
still computes the maps (it runs the whole graph), a 1x1 convolution that costs nothing
measurable beside the network.

Cache: `<weights_dir>/<model>.<weights sha256[:16]>.<exporter tag>.onnx` and a JSON sidecar
(`.onnx.json`) written after it. The sidecar is the commit record: it names the weights' and
the graph's sha256, the exporter version, whether the graph was verified against PyTorch and
by how much they differed. A graph is used only if its sidecar matches the present weights and
exporter and the file's sha256 matches the sidecar; anything else is rebuilt, never trusted.
The sidecar sits beside the graph, so whoever can write one can write the other: where the
caller passes the state directory's record (trust.TrustedHashes), the graph's sha256 must
also match what was recorded there when it was exported, or it is rebuilt from the weights. A
graph is never trusted on first use: rebuilding it needs nothing but the weights. The graph is
read once, and the bytes that were checked are the bytes that run.
A load from a verified cache needs neither torch nor TorchXRayVision.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TrustRecordError, XrvdError
from ..fsutil import write_atomically_readable
from ..log import get_logger
from .registry import ModelSpec
from .trust import TrustedHashes

OPSET = 17
# Bump when the export code changes what the graph computes: every cached export is rebuilt.
EXPORT_REVISION = 2  # 2: the `maps` output
SIDECAR_FORMAT = 1
# The largest difference from PyTorch's scores a graph may show on the check input.
TOLERANCE = 1e-4
INPUT, OUTPUT, MAPS = "image", "scores", "maps"
CHECK_BATCH = 3  # not the traced example's batch (2): the check also proves N is dynamic


class ExportError(XrvdError):
    """A model cannot be exported to ONNX, or the export does not match PyTorch."""

    reason = "export_failed"


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def exporter_version() -> str:
    """What the graph depends on besides the weights (read without importing torch)."""
    return (f"torch {_version('torch')}; torchxrayvision {_version('torchxrayvision')}; "
            f"opset {OPSET}; xrvd export revision {EXPORT_REVISION}")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def export_paths(spec: ModelSpec, weights_dir: Path, weights_sha256: str) -> tuple[Path, Path]:
    """(graph, sidecar) for these weights and this exporter."""
    tag = hashlib.sha256(exporter_version().encode()).hexdigest()[:12]
    stem = f"{spec.name}.{weights_sha256[:16]}.{tag}"
    folder = Path(weights_dir)
    return folder / f"{stem}.onnx", folder / f"{stem}.onnx.json"


# --- the cache -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cached:
    """What the cache holds for one model: status is `absent`, `invalid` (rebuild it),
    `verified` (use it) or `rejected` (exported before and found to differ from PyTorch)."""

    status: str
    path: Path
    record: dict | None = None
    reason: str | None = None
    graph: bytes | None = None  # the verified graph's bytes: run these, not the file again


def check_cache(spec: ModelSpec, weights_dir: Path, weights_sha256: str, *,
                trusted: TrustedHashes | None = None) -> Cached:
    path, sidecar = export_paths(spec, weights_dir, weights_sha256)
    if not sidecar.exists():
        if path.exists():
            return Cached("invalid", path, reason="graph without its sidecar (interrupted export?)")
        return Cached("absent", path)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return Cached("invalid", path, reason=f"sidecar unreadable ({type(exc).__name__})")
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        return Cached("invalid", path, reason="sidecar of an unknown format")
    if record.get("weights_sha256") != weights_sha256:
        return Cached("invalid", path, reason="sidecar is for other weights")
    if record.get("exporter") != exporter_version():
        return Cached("invalid", path, reason="sidecar is for another exporter version")
    if not isinstance(record.get("torchxrayvision_version"), str):
        return Cached("invalid", path, reason="sidecar incomplete")
    if record.get("verified") is not True:
        return Cached("rejected", path, record)
    size = record.get("onnx_size")
    try:
        with open(path, "rb") as f:
            # no more than the sidecar announces is read: a larger file is damaged anyway
            graph = f.read(size + 1) if isinstance(size, int) and size >= 0 else b""
    except OSError:
        return Cached("invalid", path, reason="graph file missing")
    digest = hashlib.sha256(graph).hexdigest()
    if len(graph) != size or digest != record.get("onnx_sha256"):
        return Cached("invalid", path, reason="graph file does not match the sha256 in its "
                      "sidecar (truncated or damaged)")
    if trusted is not None:
        entry = trusted.entry(path)
        if entry is None:
            return Cached("invalid", path, reason=f"graph not recorded in {trusted.path} "
                          "(exported before xrvd recorded graphs there, or put in place by hand)")
        if entry["sha256"] != digest or entry.get("weights_sha256") != weights_sha256:
            return Cached("invalid", path, reason=f"graph is not the one recorded in "
                          f"{trusted.path} when it was exported (changed since)")
    return Cached("verified", path, record, graph=graph)


def _remove_stale(spec: ModelSpec, keep: Path) -> None:
    """Exports of this model for other weights or another exporter (they are never used)."""
    for old in keep.parent.glob(f"{spec.name}.*.onnx*"):
        if old.name not in (keep.name, keep.name + ".json") and old.suffix in (".onnx", ".json"):
            with contextlib.suppress(OSError):
                old.unlink()


# --- running a graph -----------------------------------------------------------------------


def make_session(model: Path | bytes, spec: ModelSpec, *, threads: int, device: str = "cpu"):
    """An ONNX Runtime session for a graph of `spec`; raises if the graph is unusable."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # No busy-waiting between operators: xrvd never has the cores to itself (receiving,
    # converting and report writing run beside the model), and spinning threads take their
    # CPU. Costs a few percent in a process that does nothing but inference.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings are not ours to show
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, sess_options=options, providers=providers)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected = [1, spec.resolution, spec.resolution]
    if ([i.name for i in inputs] != [INPUT]
            or [o.name for o in outputs] not in ([OUTPUT], [OUTPUT, MAPS])
            or list(inputs[0].shape[1:]) != expected or len(outputs[0].shape) != 2
            or any(len(o.shape) != 4 for o in outputs[1:])
            or isinstance(inputs[0].shape[0], int)):
        raise ExportError(f"the graph is not a {spec.name} graph with a dynamic batch axis "
                          f"(inputs {[(i.name, i.shape) for i in inputs]})")
    return session


def run(session, batch: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def run_with_maps(session, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return tuple(session.run([OUTPUT, MAPS],
                             {INPUT: np.ascontiguousarray(batch, dtype=np.float32)}))


class Runner:
    """A graph ready to score batches. On the CPU with several threads, a batch of at least
    one image per thread is split into one part per thread, run at the same time (ONNX
    Runtime releases the GIL) by a single-threaded session: no thread waits for another at
    each of the graph's hundreds of operators. On 2 cores that scores DenseNet-121 10-15 %
    faster than one session using both threads, and in the service it leaves that CPU to
    receiving and converting. Smaller batches run on a session with all the threads.

    maps: offer the graph's `maps` output where it has one; False where nothing vouches for
    its maps (a sidecar or package that does not say they were checked)."""

    def __init__(self, graph: Path | bytes, spec: ModelSpec, *, threads: int,
                 device: str = "cpu", maps: bool = True):
        self.threads = max(1, threads) if device == "cpu" else 1
        self._whole = make_session(graph, spec, threads=threads, device=device)
        self._part = make_session(graph, spec, threads=1) if self.threads > 1 else None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.has_maps = maps and len(self._whole.get_outputs()) == 2  # make_session: MAPS

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._split(run, batch)

    def run_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, maps); the scores are what run() gives for the same batch."""
        if not self.has_maps:
            raise ExportError("this graph has no checked `maps` output")
        return self._split(run_with_maps, batch)

    def _split(self, function, batch: np.ndarray):
        if self._part is None or len(batch) < self.threads:
            return function(self._whole, batch)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="xrvd-onnxruntime")
        parts = np.array_split(np.ascontiguousarray(batch, dtype=np.float32), self.threads)
        futures = [self._executor.submit(function, self._part, part) for part in parts]
        results = [future.result() for future in futures]
        if isinstance(results[0], tuple):
            return tuple(np.concatenate(outputs) for outputs in zip(*results, strict=True))
        return np.concatenate(results)


def check_input(resolution: int, n: int = CHECK_BATCH) -> np.ndarray:
    """Deterministic smooth images in [-1024, 1024]: random 8x8 grids, bilinearly enlarged.
    Smooth like radiographs, so that outputs are not saturated and differences show."""
    rng = np.random.default_rng(7_2024)
    coarse = rng.uniform(-1.0, 1.0, (n, 8, 8))
    position = np.linspace(0.0, 7.0, resolution)
    low = np.minimum(position.astype(int), 6)
    w = position - low
    rows = coarse[:, low, :] * (1 - w)[None, :, None] + coarse[:, low + 1, :] * w[None, :, None]
    image = rows[:, :, low] * (1 - w) + rows[:, :, low + 1] * w
    return (image * 1024).astype(np.float32)[:, None]


def maps_tolerance(reference: np.ndarray) -> float:
    """TOLERANCE relative to the maps' scale, as it is to the scores' (which span 1): maps are
    logits, up to tens, and float32 is only so precise relative to them (PyTorch's own float32
    maps of a random ResNet-50 differ from float64 by 2e-5 of their largest value)."""
    finite = np.abs(reference[np.isfinite(reference)])
    return TOLERANCE * max(1.0, float(finite.max()) if finite.size else 1.0)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|; NaN in both places counts as equal, NaN in one as infinitely far."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    diff = np.abs(a - b)
    diff[np.isnan(a) & np.isnan(b)] = 0.0
    diff[np.isnan(diff)] = math.inf
    return float(diff.max()) if diff.size else 0.0


def torch_scores(network, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return network(torch.from_numpy(batch)).float().cpu().numpy()


# --- exporting -----------------------------------------------------------------------------


def export_graph(network, spec: ModelSpec) -> bytes:
    """The ONNX graph of `network(x)` (legacy TorchScript exporter, opset 17), with the
    `maps` output where the architecture has maps (the scores are the same either way)."""
    import torch

    outputs = [OUTPUT]
    if spec.maps_unsupported is None:
        from .cam import WithMaps

        network, outputs = WithMaps(network), [OUTPUT, MAPS]
    example = torch.from_numpy(check_input(spec.resolution, 2))
    buffer = io.BytesIO()
    # The exporter's deprecation and tracer warnings concern its own future, not this graph
    # (the check against PyTorch below is what proves the graph right).
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network, (example,), buffer, dynamo=False, opset_version=OPSET,
            input_names=[INPUT], output_names=outputs, do_constant_folding=True,
            dynamic_axes={name: {0: "batch"} for name in (INPUT, *outputs)},
        )
    return buffer.getvalue()


@dataclass
class Built:
    runner: Runner | None  # None when the graph was rejected
    record: dict
    path: Path | None  # where it is cached; None if it could not be written

    @property
    def verified(self) -> bool:
        return bool(self.record["verified"])


def build(spec: ModelSpec, network, *, weights_path: Path, weights_sha256: str,
          untrained: str | None, threads: int, device: str = "cpu",
          trusted: TrustedHashes | None = None) -> Built:
    """Export `network`, check it against PyTorch on the check input, and cache the result.

    The sidecar is written either way, so a graph that differs from PyTorch is not exported
    again at every start; its graph file is not kept. Maps that differ (by more than
    maps_tolerance) leave the scores in service: the sidecar says `"maps": false`, and the
    graph runs without them. Raises ExportError if the export or a session on its graph fails
    (nothing is cached then)."""
    import torchxrayvision as xrv

    log = get_logger(model=spec.name)
    started = time.perf_counter()
    try:
        graph = export_graph(network, spec)
        runner = Runner(graph, spec, threads=threads)
    except Exception as exc:
        raise ExportError(f"{spec.name}: cannot export to ONNX ({type(exc).__name__}: "
                          f"{str(exc)[:300]})") from exc
    batch = check_input(spec.resolution)
    reference = torch_scores(network, batch)
    difference = max(max_abs_diff(runner.run(batch), reference),  # whole batch, and alone
                     max_abs_diff(runner.run(batch[:1]), reference[:1]))
    verified = difference <= TOLERANCE
    maps_difference = maps_bound = None
    if runner.has_maps:
        from .cam import check_graph_maps

        maps_difference, maps_bound = check_graph_maps(runner, network, batch, log)
        runner.has_maps = verified and maps_difference <= maps_bound
    path, sidecar = export_paths(spec, weights_path.parent, weights_sha256)
    record = {
        "format": SIDECAR_FORMAT,
        "model": spec.name,
        "weights_file": spec.weights_file,
        "weights_sha256": weights_sha256,
        "untrained": untrained,
        "torchxrayvision_version": xrv.__version__,
        "exporter": exporter_version(),
        "onnx_file": path.name,
        "onnx_sha256": hashlib.sha256(graph).hexdigest() if verified else None,
        "onnx_size": len(graph) if verified else None,
        "verified": verified,
        "max_abs_diff": difference if math.isfinite(difference) else None,
        "tolerance": TOLERANCE,
        "maps": runner.has_maps,
        "maps_max_abs_diff": maps_difference if maps_difference is None
        or math.isfinite(maps_difference) else None,
        "maps_tolerance": maps_bound,
        "check_input": f"{CHECK_BATCH} smooth images at {spec.resolution} px (seeded)",
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        if verified:
            write_atomically_readable(path, graph)
        write_atomically_readable(sidecar, json.dumps(record, indent=2).encode())
        _remove_stale(spec, path)
    except OSError as exc:
        log.warning("model.export_not_cached", folder=str(path.parent),
                    error=exc.strerror or str(exc),
                    detail="the weights folder is not writable: the model is exported again "
                    "at every start; run `xrvd models export` where it is writable")
        path = None
    if path is not None and verified and trusted is not None:
        try:
            trusted.record(path, record["onnx_sha256"], "export", weights_sha256=weights_sha256)
        except (OSError, TrustRecordError) as exc:
            log.warning("model.export_not_recorded", path=str(path), record=str(trusted.path),
                        error=getattr(exc, "strerror", None) or str(exc),
                        detail="the graph is exported again at the next start; run `xrvd "
                        "models export` as a user who can write the state directory")
    log.info("model.exported", path=str(path) if path else None, verified=verified,
             max_abs_diff=record["max_abs_diff"], size_bytes=len(graph),
             duration_s=round(time.perf_counter() - started, 3))
    if verified:
        if device != "cpu":  # the check ran on the CPU; serve on the configured device
            runner = Runner(graph, spec, threads=threads, device=device, maps=runner.has_maps)
        return Built(runner, record, path)
    return Built(None, record, path)
