"""Weights files: where they live, fetching, importing, the record of what was installed, and
loading them into TorchXRayVision's own model classes without ever running code from them.

Files keep the names TorchXRayVision gives them (the basename of the release URL), so a folder
prepared for TorchXRayVision works for xrvd and the reverse. A file is only ever put in place by
an atomic rename after it has been verified to load into the right architecture: a partial
download or a bad copy never looks like usable weights.

Reading a file never runs code from it (safeload.py reads it with an allow-list; only its
tensors are kept, loaded into a network built here), and a file is used only as it was
installed (trust.py keeps the record of installed files in the state directory).
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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import (
    DownloadError,
    TrustRecordError,
    UntrainedWeightsError,
    WeightsChangedError,
    WeightsCorruptError,
    WeightsMissingError,
)
from ..fsutil import fsync_path
from ..log import get_logger
from .registry import ModelSpec
from .safeload import MAX_WEIGHTS_BYTES, PickledModule, read_checkpoint
from .trust import TrustedHashes

UNTRAINED_MARKER = "xrvd_untrained"  # attribute set only by pipeline/untrained.py


@dataclass(frozen=True)
class LoadedNetwork:
    network: Any  # torch.nn.Module
    path: Path
    untrained: str | None  # the marker text if these are random test weights
    sha256: str  # of the bytes the network was read from


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
            download_url: str | None = None, trusted: TrustedHashes | None = None) -> Path:
    """The weights file for `spec`, downloading it first only if config allows it."""
    path = weights_path(spec, weights_dir)
    if path.is_file():
        return path
    if not allow_download:
        raise WeightsMissingError(missing_message(spec, weights_dir))
    return fetch(spec, weights_dir, base_url=download_url, trusted=trusted)


def fetch(spec: ModelSpec, weights_dir: Path, *, base_url: str | None = None,
          timeout: float = 30.0, trusted: TrustedHashes | None = None) -> Path:
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

    return _install(spec, weights_dir, download, trusted, "fetch")


def import_file(spec: ModelSpec, source: Path, weights_dir: Path, *,
                trusted: TrustedHashes | None = None) -> Path:
    """Stage a weights file carried in by hand, after checking it loads into the model."""
    source = Path(source)
    if not source.is_file():
        raise WeightsMissingError(f"{source}: no such file to import")

    def copy(target: Path) -> None:
        with open(source, "rb") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())

    return _install(spec, weights_dir, copy, trusted, "import")


def _install(spec: ModelSpec, weights_dir: Path, produce, trusted: TrustedHashes | None,
             source: str) -> Path:
    """Write into a hidden staging folder beside the final file, verify, rename, record."""
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
        loaded = load_network(spec, staged)  # raises WeightsCorruptError if unloadable
        if loaded.untrained:
            raise UntrainedWeightsError(
                f"refusing to install UNTRAINED random weights (written by xrvd's test "
                f"tooling) as {spec.name}; use the published file {spec.weights_url}"
            )
        final = weights_path(spec, weights_dir)
        os.replace(staged, final)
        fsync_path(weights_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if trusted is not None:
        try:
            trusted.record(final, loaded.sha256, source)
        except OSError as exc:
            raise TrustRecordError(
                f"installed {final}, but cannot record its sha256 in {trusted.path} "
                f"({exc.strerror or exc}); xrvd refuses weights that differ from their record, "
                "so run this command again as a user who can write the state directory"
            ) from exc
        get_logger(model=spec.name).info("weights.recorded", path=str(final),
                                         sha256=loaded.sha256, source=source,
                                         record=str(trusted.path))
    return final


# --- loading --------------------------------------------------------------------------------


def load_network(spec: ModelSpec, path: Path, *,
                 expected_sha256: str | None = None) -> LoadedNetwork:
    """Build the model from a weights file, reading it once: the bytes that are hashed are
    the bytes that are loaded. `expected_sha256`: what check_recorded found a moment ago.

    TorchXRayVision prints its own messages to stdout; they are sent to stderr so that
    machine-readable output (`--format json`) stays clean.
    """
    path = Path(path)
    data = _read_bounded(spec, path)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise WeightsChangedError(f"{path} changed while it was being loaded; if you are "
                                  f"replacing it, use `xrvd models import {spec.name} FILE`")
    with contextlib.redirect_stdout(sys.stderr):
        checkpoint = read_checkpoint(spec, data, path)
    untrained = _untrained_marker(spec, checkpoint, path)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            network = _build(spec, path, checkpoint)
    except WeightsCorruptError:
        raise
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
    return LoadedNetwork(network, path, untrained, digest)


def _read_bounded(spec: ModelSpec, path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_WEIGHTS_BYTES:
                raise WeightsCorruptError(_too_large(spec, path))
            data = f.read(MAX_WEIGHTS_BYTES + 1)
    except OSError as exc:
        raise WeightsCorruptError(f"{path}: cannot read the weights file "
                                  f"({exc.strerror or exc})") from exc
    if len(data) > MAX_WEIGHTS_BYTES:
        raise WeightsCorruptError(_too_large(spec, path))
    return data


def _too_large(spec: ModelSpec, path: Path) -> str:
    return (f"{path}: larger than {MAX_WEIGHTS_BYTES >> 20} MB, which no TorchXRayVision "
            f"weights file is; is this the right file for {spec.name}?")


# --- from what was read to a network ----------------------------------------------------------


def _untrained_marker(spec: ModelSpec, checkpoint: Any, path: Path) -> str | None:
    if isinstance(checkpoint, PickledModule):
        marker = checkpoint.__dict__.get("state", {}).get(UNTRAINED_MARKER)
    else:
        marker = getattr(checkpoint, UNTRAINED_MARKER, None)
    if marker is not None and not isinstance(marker, str):
        raise WeightsCorruptError(f"{path}: holds a {UNTRAINED_MARKER} of an unexpected type")
    return marker


def module_state_dict(root: PickledModule) -> OrderedDict:
    """What `state_dict()` of the pickled model would give, taken from its stand-ins:
    parameters, then persistent buffers, then each child, as torch orders them."""
    import torch

    out: OrderedDict = OrderedDict()
    seen: set[int] = set()

    def walk(module: Any, prefix: str, depth: int) -> None:
        if not isinstance(module, PickledModule) or depth > 32 or id(module) in seen:
            raise ValueError(f"{prefix or 'the model'} is not a module of a model")
        seen.add(id(module))
        state = module.__dict__.get("state")
        if state is None:
            raise ValueError(f"{prefix or 'the model'} was pickled without its attributes")
        skip = state.get("_non_persistent_buffers_set", set())
        tables = [state.get("_parameters", {}), state.get("_buffers", {}),
                  state.get("_modules", {})]
        if not (all(isinstance(t, dict) for t in tables) and isinstance(skip, set)):
            raise ValueError(f"{prefix or 'the model'} has module tables of unexpected types")
        parameters, buffers, children = tables
        for name, value in [*parameters.items(),
                            *((n, v) for n, v in buffers.items() if n not in skip)]:
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value.detach()
        for name, child in children.items():
            if child is not None:
                walk(child, f"{prefix}{name}.", depth + 1)

    walk(root, "", 0)
    return out


def _build(spec: ModelSpec, path: Path, checkpoint: Any) -> Any:
    if spec.architecture == "densenet121":
        return densenet_network(spec, module_state_dict(checkpoint), path)
    if spec.architecture == "resnet50":
        return resnet_network(spec, checkpoint, path)
    if spec.architecture == "jfhealthcare-densenet121":
        return jfhealthcare_network(checkpoint, path)
    raise WeightsCorruptError(f"no loader for architecture {spec.architecture}")


# TorchXRayVision's constructors read the weights file themselves, with weights_only=False:
# the two below repeat what they set up around that read, with tensors read here. A test
# compares each with TorchXRayVision's own construction.


def densenet_network(spec: ModelSpec, state_dict: dict, path: Path) -> Any:
    """`xrv.models.DenseNet(weights=spec.name)`, with these tensors."""
    import torch
    import torchxrayvision as xrv

    upstream = xrv.models.model_urls[spec.name]
    net = xrv.models.DenseNet(num_classes=len(upstream["labels"]))
    net.weights = spec.name
    net.targets = upstream["labels"]
    net.pathologies = net.targets
    net.weights_filename_local = str(path)
    net.load_state_dict(state_dict)
    net.eval()
    if "op_threshs" in upstream:
        net.op_threshs = torch.tensor(upstream["op_threshs"])
    if "input_resolution" in upstream:
        net.input_resolution = upstream["input_resolution"]
    return net


def resnet_network(spec: ModelSpec, state_dict: dict, path: Path) -> Any:
    """`xrv.models.ResNet(weights=spec.name)`, with this state dict."""
    import torch
    import torchvision
    import torchxrayvision as xrv

    upstream = xrv.models.model_urls[spec.name]
    net = xrv.models.ResNet.__new__(xrv.models.ResNet)
    torch.nn.Module.__init__(net)
    net.weights = spec.name
    net.apply_sigmoid = False
    net.weights_filename_local = str(path)
    net.weights_dict = upstream
    net.targets = upstream["labels"]
    net.pathologies = net.targets
    net.model = torchvision.models.resnet50(num_classes=len(upstream["labels"]), weights=None)
    net.model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.model.load_state_dict(state_dict)
    if "op_threshs" in upstream:
        net.register_buffer("op_threshs", torch.tensor(upstream["op_threshs"]))
    if "input_resolution" in upstream:
        net.input_resolution = upstream["input_resolution"]
    net.eval()
    return net


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
