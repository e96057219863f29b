"""Weights files: where they live, fetching, importing, and loading them with
TorchXRayVision's own code.

Files keep the names TorchXRayVision gives them (the basename of the release URL), so a folder
prepared for TorchXRayVision works for xrvd and the reverse. A file is only ever put in place by
an atomic rename after it has been verified to load into the right architecture: a partial
download or a bad copy never looks like usable weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import (
    DownloadError,
    UntrainedWeightsError,
    WeightsCorruptError,
    WeightsMissingError,
)
from ..fsutil import fsync_path
from .registry import ModelSpec

UNTRAINED_MARKER = "xrvd_untrained"  # attribute set only by pipeline/untrained.py


@dataclass(frozen=True)
class LoadedNetwork:
    network: Any  # torch.nn.Module
    path: Path
    untrained: str | None  # the marker text if these are random test weights


def weights_path(spec: ModelSpec, weights_dir: Path) -> Path:
    return Path(weights_dir) / spec.weights_file


def missing_message(spec: ModelSpec, weights_dir: Path) -> str:
    path = weights_path(spec, weights_dir)
    return (
        f"weights for model {spec.name!r} not found: expected the file {spec.weights_file} in "
        f"{Path(weights_dir)}. Download it with `xrvd models fetch {spec.name}`, or on a "
        f"machine without internet access copy it in with "
        f"`xrvd models import {spec.name} /path/to/{spec.weights_file}` (the file is published "
        f"at {spec.weights_url}). Expected path: {path}"
    )


def require(spec: ModelSpec, weights_dir: Path, *, allow_download: bool = False,
            download_url: str | None = None) -> Path:
    """The weights file for `spec`, downloading it first only if config allows it."""
    path = weights_path(spec, weights_dir)
    if path.is_file():
        return path
    if not allow_download:
        raise WeightsMissingError(missing_message(spec, weights_dir))
    return fetch(spec, weights_dir, base_url=download_url)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(spec: ModelSpec, weights_dir: Path, *, base_url: str | None = None,
          timeout: float = 30.0) -> Path:
    """Download TorchXRayVision's published weights (or a mirror's copy) and put them in place."""
    url = (base_url.rstrip("/") + "/" + spec.weights_file) if base_url else spec.weights_url

    def download(target: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
                expected = int(response.headers.get("Content-Length") or 0)
                shutil.copyfileobj(response, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
                if expected and out.tell() != expected:
                    raise DownloadError(
                        f"download of {url} stopped after {out.tell()} of {expected} bytes; "
                        "run the command again"
                    )
        except (urllib.error.URLError, OSError, ValueError) as exc:
            http_status = isinstance(exc, urllib.error.HTTPError)
            reason = exc if http_status else getattr(exc, "reason", None) or exc
            raise DownloadError(
                f"cannot download {url}: {reason}. If this machine has no internet access, "
                f"download the file elsewhere and run `xrvd models import {spec.name} FILE`"
            ) from exc

    return _install(spec, weights_dir, download)


def import_file(spec: ModelSpec, source: Path, weights_dir: Path) -> Path:
    """Stage a weights file carried in by hand, after checking it loads into the model."""
    source = Path(source)
    if not source.is_file():
        raise WeightsMissingError(f"{source}: no such file to import")

    def copy(target: Path) -> None:
        with open(source, "rb") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())

    return _install(spec, weights_dir, copy)


def _install(spec: ModelSpec, weights_dir: Path, produce) -> Path:
    """Write into a hidden staging folder beside the final file, verify, then rename."""
    weights_dir = Path(weights_dir)
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=weights_dir))
    except OSError as exc:
        raise WeightsMissingError(
            f"cannot write to the weights folder {weights_dir}: {exc.strerror or exc}; "
            "set model.weights_dir in the config to a writable folder"
        ) from exc
    try:
        staged = staging / spec.weights_file
        produce(staged)
        if load_network(spec, staged).untrained:  # raises WeightsCorruptError if unloadable
            raise UntrainedWeightsError(
                f"refusing to install UNTRAINED random weights (written by xrvd's test "
                f"tooling) as {spec.name}; use the published file {spec.weights_url}"
            )
        final = weights_path(spec, weights_dir)
        os.replace(staged, final)
        fsync_path(weights_dir)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_network(spec: ModelSpec, path: Path) -> LoadedNetwork:
    """Build the model from a weights file with TorchXRayVision's own classes.

    TorchXRayVision prints its own messages to stdout; they are sent to stderr so that
    machine-readable output (`--format json`) stays clean.
    """
    import torch

    path = Path(path)
    # The DenseNet weights are a whole pickled model (TorchXRayVision loads them the same way,
    # with weights_only=False); the other two are state dicts.
    pickled_model = spec.architecture == "densenet121"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            checkpoint = torch.load(path, map_location="cpu", weights_only=not pickled_model)
    except Exception as exc:
        raise WeightsCorruptError(
            f"{path}: cannot read the weights file ({type(exc).__name__}: {exc}); it is not a "
            f"PyTorch file or it is damaged. Replace it with `xrvd models fetch {spec.name}` or "
            f"`xrvd models import {spec.name} FILE`"
        ) from exc
    expected = torch.nn.Module if pickled_model else dict
    if not isinstance(checkpoint, expected):
        raise WeightsCorruptError(
            f"{path}: holds a {type(checkpoint).__name__}, but {spec.name} weights are "
            f"{'a pickled TorchXRayVision model' if pickled_model else 'a state dict'}; "
            "is this the right file?"
        )
    untrained = getattr(checkpoint, UNTRAINED_MARKER, None)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            network = _build(spec, path, checkpoint)
    except Exception as exc:
        raise WeightsCorruptError(
            f"{path}: does not load into {spec.architecture} for {spec.name} "
            f"({type(exc).__name__}: {str(exc)[:300]}); is this the right file for this model?"
        ) from exc
    network.eval()
    import torchxrayvision as xrv

    # TorchXRayVision prints a normalisation warning on the first image it sees; our inputs
    # are normalised by construction, and the print would corrupt machine-readable output.
    xrv.utils.warning_log["norm_check"] = True
    return LoadedNetwork(network, path, untrained)


def _build(spec: ModelSpec, path: Path, checkpoint: Any) -> Any:
    import torchxrayvision as xrv

    # TorchXRayVision's constructors load <cache_dir>/<basename of the URL>; the file exists,
    # so they never try to download.
    if spec.architecture == "densenet121":
        return xrv.models.DenseNet(weights=spec.name, cache_dir=str(path.parent))
    if spec.architecture == "resnet50":
        return xrv.models.ResNet(weights=spec.name, cache_dir=str(path.parent))
    if spec.architecture == "jfhealthcare-densenet121":
        return jfhealthcare_network(checkpoint, path)
    raise WeightsCorruptError(f"no loader for architecture {spec.architecture}")


def jfhealthcare_network(state_dict: dict | None, path: Path | None = None) -> Any:
    """TorchXRayVision's JF Healthcare DenseNet, built from a state dict we loaded ourselves:
    its constructor only ever reads ~/.torchxrayvision, and xrvd keeps weights in the
    configured folder. This repeats the constructor's few lines; forward() is theirs."""
    import torch
    from torchxrayvision.baseline_models import jfhealthcare as jf

    net = jf.DenseNet.__new__(jf.DenseNet)
    torch.nn.Module.__init__(net)
    net.apply_sigmoid = True
    with open(os.path.join(jf.thisfolder, "config", "example.json")) as f:
        net.cfg = SimpleNamespace(**json.load(f))
    # Upstream's config asks the backbone to start from ImageNet weights, which it downloads
    # at every construction (failing offline) only for the checkpoint to overwrite them all.
    net.cfg.pretrained = False
    classifier = jf.classifier.Classifier(net.cfg)
    if state_dict is not None:
        classifier.load_state_dict(state_dict)
    net.model = torch.nn.DataParallel(classifier).eval()
    net.weights_filename_local = str(path) if path else None
    net.pathologies = net.targets
    return net
