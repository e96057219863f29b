"""Load a registry model and run batched inference. No DICOM here: inputs are the arrays that
convert.py produces, outputs are scores for the labels the model really predicts.

Two backends run the same network: ONNX Runtime (a graph exported from the loaded
TorchXRayVision model and checked against it, see onnxrt.py) and PyTorch eager. `auto` picks
ONNX Runtime when it is installed; a model whose graph cannot be exported or does not match
PyTorch runs on PyTorch, with a `model.backend_fallback` event that says why.

Both backends also give class activation maps (cam.py) for the models that have them:
`predict_with_maps`; `maps_unavailable` says why a classifier has none.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UntrainedWeightsError, WeightsMissingError, XrvdError
from ..cpus import available_cpus
from ..log import get_logger
from . import onnxrt, package
from .package import PackageError, package_path
from .registry import ModelSpec, get_spec
from .untrained import ALLOW_UNTRAINED_ENV, untrained_allowed_by_environment
from .trust import TrustedHashes, check_recorded, record_first_use
from .weights import load_network, require, weights_path

BACKENDS = ("auto", "onnxruntime", "torch")


class MapsUnavailableError(XrvdError):
    """This model, or the form it was loaded from, has no class activation maps."""

    reason = "maps_unavailable"


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a score: goes into every result and report."""

    name: str
    architecture: str
    weights_file: str
    weights_sha256: str
    torchxrayvision_version: str
    untrained: bool


class Classifier:
    """A loaded model. `backend` says what runs it: "onnxruntime" or "torch"."""

    def __init__(self, spec: ModelSpec, network, identity: ModelIdentity, device: str = "cpu",
                 *, backend: str = "torch", runner: onnxrt.Runner | None = None,
                 weights_path: Path | None = None):
        self.spec = spec
        self._network = network
        self.identity = identity
        self.device = device
        self.backend = backend
        self._runner = runner
        self._weights_path = weights_path
        self._indices = [label.index for label in spec.labels]
        self._with_maps = None  # cam.WithMaps around the torch network, made when first asked

    @property
    def network(self):
        """The TorchXRayVision network (torch.nn.Module). On the ONNX Runtime backend it is
        not loaded for inference; asking for it here loads it (with torch) from the weights."""
        if self._network is None:
            if self._weights_path is None or not torch_installed():
                raise WeightsMissingError(
                    f"{self.spec.name} was loaded from its model package: the network itself "
                    "needs PyTorch and the weights file (`xrvd models fetch` on a full "
                    "install)")
            loaded = load_network(self.spec, self._weights_path,
                                  expected_sha256=self.identity.weights_sha256)
            self._network = loaded.network.to(self.device)
        return self._network

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.label_names

    @property
    def resolution(self) -> int:
        return self.spec.resolution

    @classmethod
    def load(cls, name: str, weights_dir: Path, *, allow_download: bool = False,
             download_url: str | None = None, device: str = "cpu", threads: int = 0,
             allow_untrained: bool = False, backend: str = "auto",
             trusted: TrustedHashes | None = None) -> Classifier:
        """backend: "auto" (ONNX Runtime if installed, else torch), "onnxruntime" or "torch".
        threads: intra-op threads; 0 means the CPUs this process may use (available_cpus).
        trusted: the state directory's record of installed weights and exported graphs;
        without it nothing is compared with a record (tests, benchmarks, the demo)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        spec = get_spec(name)
        allowed = allow_untrained or untrained_allowed_by_environment()
        threads = threads or available_cpus()
        log = get_logger(model=spec.name)
        if backend != "torch" and package_path(spec, weights_dir).exists():
            classifier = cls._load_package(spec, weights_dir, device=device, threads=threads,
                                           allowed=allowed, log=log, trusted=trusted)
            if classifier is not None:
                return classifier
        if not torch_installed() and backend == "torch":
            raise WeightsMissingError(
                f"{spec.name}: model.backend torch needs PyTorch, which this install does not "
                "have (a service install); use backend auto or onnxruntime with a model package")
        if not torch_installed():
            raise WeightsMissingError(
                f"{spec.name}: no model package at {package_path(spec, weights_dir)}, and this "
                "install has no PyTorch to run the weights (a service install scores from model "
                f"packages only). On a full install run `xrvd models export {spec.name}` and "
                "bring the package here with `xrvd models import-package FILE`")
        path = require(spec, weights_dir, allow_download=allow_download,
                       download_url=download_url, trusted=trusted)
        checked = check_recorded(spec, path, trusted)
        weights_sha256 = checked.sha256
        loaded = None
        if _choose_backend(backend, device, log) == "onnxruntime":
            classifier, loaded = cls._load_onnx(spec, path, weights_sha256, device=device,
                                                threads=threads, allowed=allowed, log=log,
                                                trusted=trusted)
            if classifier is not None:
                record_first_use(spec, checked, trusted)
                return classifier
        import torch
        import torchxrayvision as xrv

        if loaded is None:
            loaded = load_network(spec, path, expected_sha256=weights_sha256)
            refuse_untrained(spec, path, loaded.untrained, allowed)
        record_first_use(spec, checked, trusted)
        torch.set_num_threads(threads)
        network = loaded.network.to(device)
        identity = _identity(spec, weights_sha256, xrv.__version__, loaded.untrained)
        log.info("model.backend", backend="torch", device=device, threads=threads)
        return cls(spec, network, identity, device, backend="torch", weights_path=path)

    @classmethod
    def _load_package(cls, spec: ModelSpec, weights_dir: Path, *, device: str, threads: int,
                      allowed: bool, log, trusted: TrustedHashes | None) -> Classifier | None:
        """The model from its installed package, verified (package.py); None where the
        weights beside it are other weights and PyTorch is here to run them instead."""
        path = package_path(spec, weights_dir)
        weights = weights_path(spec, weights_dir)
        try:
            return cls._from_package(spec, path, weights, device=device, threads=threads,
                                     allowed=allowed, log=log, trusted=trusted)
        except PackageError as exc:
            if not (torch_installed() and weights.is_file()):
                raise
            # A full install with the weights: a package it cannot use (exported by another
            # xrvd, changed since) does not stop it; the weights run as before.
            log.warning("model.package_ignored", path=str(path), weights=str(weights),
                        reason=str(exc))
            return None

    @classmethod
    def _from_package(cls, spec: ModelSpec, path: Path, weights: Path, *, device: str,
                      threads: int, allowed: bool, log,
                      trusted: TrustedHashes | None) -> Classifier | None:
        if not onnxrt.onnxruntime_installed():
            if torch_installed():
                return None
            raise PackageError(f"{path}: ONNX Runtime is not installed to run it")
        found = package.read(path)
        package.check_recorded(found, trusted, log)
        if weights.is_file():
            digest = check_recorded(spec, weights, trusted).sha256
            if digest != found.weights_sha256:
                if not torch_installed():
                    raise PackageError(
                        f"{path} was exported from other weights than {weights} "
                        f"(sha256 {found.weights_sha256[:16]}... against {digest[:16]}...), "
                        "and this install has no PyTorch to run the weights: export the "
                        "package again from these weights, or remove the one you do not want")
                log.warning("model.package_ignored", path=str(path), weights=str(weights),
                            reason="exported from other weights than the weights file's")
                return None
        refuse_untrained(spec, path, found.manifest.get("untrained"), allowed)
        runner = package.verify(found, spec, threads=threads, device=device)
        identity = _identity(spec, found.weights_sha256,
                             found.manifest["torchxrayvision_version"],
                             found.manifest.get("untrained"))
        log.info("model.backend", backend="onnxruntime", source="package", path=str(path),
                 device=device, threads=threads)
        return cls(spec, None, identity, device, backend="onnxruntime", runner=runner,
                   weights_path=weights if weights.is_file() else None)

    @classmethod
    def _load_onnx(cls, spec: ModelSpec, path: Path, weights_sha256: str, *, device: str,
                   threads: int, allowed: bool, log, trusted: TrustedHashes | None):
        """(classifier, None) on ONNX Runtime, or (None, the loaded network) to run on torch."""
        cached = onnxrt.check_cache(spec, path.parent, weights_sha256, trusted=trusted)
        if cached.status == "verified":
            record = cached.record
            refuse_untrained(spec, path, record.get("untrained"), allowed)
            try:
                runner = onnxrt.Runner(cached.graph, spec, threads=threads, device=device,
                                       maps=record.get("maps") is True)
            except Exception as exc:  # the file matched its sha256, but cannot be run
                cached = onnxrt.Cached("invalid", cached.path, reason=f"{type(exc).__name__}: "
                                       f"{str(exc)[:200]}")
            else:
                identity = _identity(spec, weights_sha256, record["torchxrayvision_version"],
                                     record.get("untrained"))
                log.info("model.backend", backend="onnxruntime", source="cache",
                         path=str(cached.path), device=device, threads=threads)
                return cls(spec, None, identity, device, backend="onnxruntime",
                           runner=runner, weights_path=path), None
        if cached.status == "invalid":
            log.warning("model.export_invalid", path=str(cached.path), reason=cached.reason,
                        action="rebuilding it")
        loaded = load_network(spec, path, expected_sha256=weights_sha256)
        refuse_untrained(spec, path, loaded.untrained, allowed)
        if cached.status == "rejected":
            _fallback(log, "scores_differ", max_abs_diff=cached.record.get("max_abs_diff"),
                      recorded_in=str(cached.path) + ".json")
            return None, loaded
        try:
            built = onnxrt.build(spec, loaded.network, weights_path=path,
                                 weights_sha256=weights_sha256, untrained=loaded.untrained,
                                 threads=threads, device=device, trusted=trusted)
        except onnxrt.ExportError as exc:
            _fallback(log, "export_failed", error=str(exc))
            return None, loaded
        if not built.verified:
            _fallback(log, "scores_differ", max_abs_diff=built.record["max_abs_diff"])
            return None, loaded
        identity = _identity(spec, weights_sha256, built.record["torchxrayvision_version"],
                             loaded.untrained)
        log.info("model.backend", backend="onnxruntime", source="exported",
                 path=str(built.path) if built.path else None, device=device, threads=threads)
        # The torch network is dropped: serving from the graph is what saves the memory.
        return cls(spec, None, identity, device, backend="onnxruntime",
                   runner=built.runner, weights_path=path), None

    @classmethod
    def from_config(cls, config, *, name: str | None = None,
                    weights_dir: Path | None = None) -> Classifier:
        """The model a config asks for (every command that classifies loads it this way),
        checked against the record of installed weights in its state directory."""
        model = config.model
        return cls.load(name or model.name, weights_dir or config.weights_dir,
                        allow_download=model.allow_download, download_url=model.download_url,
                        device=model.device, threads=model.threads, backend=model.backend,
                        trusted=TrustedHashes(config.state_dir))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, R, R) float32 in [-1024, 1024] -> (N, len(labels)) scores in [0, 1]."""
        self._check(batch)
        if self._runner is not None:
            return self._runner.run(batch)[:, self._indices].astype(np.float32)
        import torch

        with torch.inference_mode():
            out = self.network(torch.from_numpy(batch).to(self.device))
        return out[:, self._indices].float().cpu().numpy()

    def _check(self, batch: np.ndarray) -> None:
        expected = (1, self.resolution, self.resolution)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(f"expected a batch of shape (N, {expected}), got {batch.shape}")

    @property
    def maps_unavailable(self) -> str | None:
        """Why predict_with_maps cannot run here (for a heatmap's "unsupported"); None if it
        can."""
        if self.spec.maps_unsupported is not None:
            return f"{self.spec.name} has no heatmaps: {self.spec.maps_unsupported}"
        if self._runner is not None and not self._runner.has_maps:
            return (f"the ONNX graph {self.spec.name} runs from has no checked maps (a model "
                    "package exported before xrvd made heatmaps, or maps that differed from "
                    "PyTorch's at export): export it again with `xrvd models export "
                    f"{self.spec.name}` on a full install, or use model.backend torch")
        return None

    def predict_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, R, R) float32 in [-1024, 1024] -> (scores, maps) for the model's labels:
        scores (N, len(labels)) as predict gives them, and maps (N, len(labels), h, w)
        float32, the class activation maps in logit space (cam.py: each map's mean is its
        label's logit, before the sigmoid and operating-point normalisation; h x w is the
        network's last feature grid, 7 x 7 for DenseNet-121, 16 x 16 for ResNet-50, whose
        cells tile the input square). Raises MapsUnavailableError (see maps_unavailable)."""
        reason = self.maps_unavailable
        if reason is not None:
            raise MapsUnavailableError(reason)
        self._check(batch)
        if self._runner is not None:
            scores, maps = self._runner.run_with_maps(batch)
            return (scores[:, self._indices].astype(np.float32),
                    maps[:, self._indices].astype(np.float32))
        import torch

        from .cam import WithMaps

        if self._with_maps is None:
            self._with_maps = WithMaps(self.network)
        with torch.inference_mode():
            scores, maps = self._with_maps(torch.from_numpy(batch).to(self.device))
        return (scores[:, self._indices].float().cpu().numpy(),
                maps[:, self._indices].float().cpu().numpy())

    def predict_many(self, arrays: list[np.ndarray], batch_size: int = 8, *,
                     maps: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Score any number of (1, 1, R, R) inputs, `batch_size` at a time; with maps, the
        scores and the maps (predict_with_maps)."""
        chunks = [np.concatenate(arrays[start:start + batch_size])
                  for start in range(0, len(arrays), batch_size)]
        if not maps:
            if not chunks:
                return np.zeros((0, len(self.labels)), dtype=np.float32)
            return np.concatenate([self.predict(chunk) for chunk in chunks])
        if not chunks:
            return (np.zeros((0, len(self.labels)), dtype=np.float32),
                    np.zeros((0, len(self.labels), 0, 0), dtype=np.float32))
        results = [self.predict_with_maps(chunk) for chunk in chunks]
        return (np.concatenate([scores for scores, _ in results]),
                np.concatenate([found for _, found in results]))


def refuse_untrained(spec: ModelSpec, path: Path, untrained: str | None, allowed: bool) -> None:
    if untrained and not allowed:
        raise UntrainedWeightsError(
            f"{path} holds UNTRAINED random weights written by xrvd's test tooling; their "
            "scores would be meaningless. Replace the file with the published weights "
            f"(`xrvd models fetch {spec.name}` or `xrvd models import {spec.name} FILE`). "
            f"Tests and benchmarks opt in with {ALLOW_UNTRAINED_ENV}."
        )


def _identity(spec: ModelSpec, weights_sha256: str, xrv_version: str,
              untrained: str | None) -> ModelIdentity:
    return ModelIdentity(
        name=spec.name,
        architecture=spec.architecture,
        weights_file=spec.weights_file,
        weights_sha256=weights_sha256,
        torchxrayvision_version=xrv_version,
        untrained=bool(untrained),
    )


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def install_kind() -> tuple[str, str]:
    """("full" or "service", what this install can do), for check-config and start-up."""
    torch = torch_installed() and importlib.util.find_spec("torchxrayvision") is not None
    ort = onnxrt.onnxruntime_installed()
    if torch:
        return "full", ("PyTorch and TorchXRayVision installed: every backend, weights files, "
                        "`xrvd models export`" + ("" if ort else "; ONNX Runtime not installed: "
                                                  "backend torch only"))
    if ort:
        return "service", ("PyTorch not installed: backend torch unavailable; models run on "
                           "ONNX Runtime from model packages only (`xrvd models export` on a "
                           "full install, then `xrvd models import-package`)")
    return "incomplete", ("neither PyTorch nor ONNX Runtime is installed: no model can run; "
                          "reinstall with `uv sync --locked`")


def _fallback(log, reason: str, **details) -> None:
    log.warning("model.backend_fallback", backend="torch", reason=reason,
                tolerance=onnxrt.TOLERANCE, **details)


def _choose_backend(backend: str, device: str, log) -> str:
    """"onnxruntime" or "torch" for a requested backend on a device."""
    if backend == "torch":
        return "torch"
    if not onnxrt.onnxruntime_installed():
        if backend == "onnxruntime":
            _fallback(log, "onnxruntime_not_installed")
        return "torch"
    if device == "cuda" and not onnxrt.cuda_provider_available():
        if backend == "onnxruntime":
            _fallback(log, "onnxruntime_cuda_provider_unavailable")
        return "torch"
    return "onnxruntime"
