"""Load a registry model and run batched inference. No DICOM here: inputs are the arrays that
convert.py produces, outputs are scores for the labels the model really predicts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UntrainedWeightsError
from .registry import ModelSpec, get_spec
from .untrained import ALLOW_UNTRAINED_ENV, untrained_allowed_by_environment
from .weights import load_network, require, sha256


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
    def __init__(self, spec: ModelSpec, network, identity: ModelIdentity, device: str = "cpu"):
        self.spec = spec
        self.network = network
        self.identity = identity
        self.device = device
        self._indices = [label.index for label in spec.labels]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.label_names

    @property
    def resolution(self) -> int:
        return self.spec.resolution

    @classmethod
    def load(cls, name: str, weights_dir: Path, *, allow_download: bool = False,
             download_url: str | None = None, device: str = "cpu", threads: int = 0,
             allow_untrained: bool = False) -> Classifier:
        import torch
        import torchxrayvision as xrv

        spec = get_spec(name)
        path = require(spec, weights_dir, allow_download=allow_download,
                       download_url=download_url)
        loaded = load_network(spec, path)
        if loaded.untrained and not (allow_untrained or untrained_allowed_by_environment()):
            raise UntrainedWeightsError(
                f"{path} holds UNTRAINED random weights written by xrvd's test tooling; their "
                "scores would be meaningless. Replace the file with the published weights "
                f"(`xrvd models fetch {name}` or `xrvd models import {name} FILE`). Tests and "
                f"benchmarks opt in with {ALLOW_UNTRAINED_ENV}."
            )
        if threads:
            torch.set_num_threads(threads)
        network = loaded.network.to(device)
        identity = ModelIdentity(
            name=spec.name,
            architecture=spec.architecture,
            weights_file=spec.weights_file,
            weights_sha256=sha256(path),
            torchxrayvision_version=xrv.__version__,
            untrained=bool(loaded.untrained),
        )
        return cls(spec, network, identity, device)

    @classmethod
    def from_config(cls, config, *, name: str | None = None,
                    weights_dir: Path | None = None) -> Classifier:
        """The model a config asks for (every command that classifies loads it this way)."""
        model = config.model
        return cls.load(name or model.name, weights_dir or config.weights_dir,
                        allow_download=model.allow_download, download_url=model.download_url,
                        device=model.device, threads=model.threads)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, R, R) float32 in [-1024, 1024] -> (N, len(labels)) scores in [0, 1]."""
        import torch

        expected = (1, self.resolution, self.resolution)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(f"expected a batch of shape (N, {expected}), got {batch.shape}")
        with torch.inference_mode():
            out = self.network(torch.from_numpy(batch).to(self.device))
        return out[:, self._indices].float().cpu().numpy()

    def predict_many(self, arrays: list[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """Score any number of (1, 1, R, R) inputs, `batch_size` at a time."""
        results = [
            self.predict(np.concatenate(arrays[start:start + batch_size]))
            for start in range(0, len(arrays), batch_size)
        ]
        if not results:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(results)
