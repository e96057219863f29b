"""UNTRAINED (random) weights, for tests and benchmarks only.

Real weights cannot be downloaded everywhere xrvd is developed, so tests write randomly
initialised networks in TorchXRayVision's own file formats and let the real loading code read
them. Every file written here carries a marker that the loader finds, and a model with such
weights refuses to run unless the caller explicitly allows untrained weights: in code
(`allow_untrained=True`) or with the environment variable below. No config key reaches it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .registry import ModelSpec, get_spec
from .weights import UNTRAINED_MARKER, jfhealthcare_network, weights_path

UNTRAINED_BANNER = (
    "UNTRAINED random weights (xrvd test/benchmark tooling): the scores are meaningless "
    "and are NOT a diagnosis"
)
ALLOW_UNTRAINED_ENV = "XRVD_TESTING_ALLOW_UNTRAINED_WEIGHTS"


def untrained_allowed_by_environment() -> bool:
    return os.environ.get(ALLOW_UNTRAINED_ENV) == "yes-these-scores-are-meaningless"


def write_untrained_weights(name: str, weights_dir: Path, *, seed: int = 0) -> Path:
    """Write random weights for model `name` into `weights_dir`, in TorchXRayVision's format.

    Batch-norm statistics are calibrated on smooth synthetic images so that outputs spread over
    (0, 1) and depend on the input, which makes score comparisons in tests meaningful.
    """
    import torch

    spec = get_spec(name)
    torch.manual_seed(seed)
    network, trainable = _random_network(spec)
    _calibrate_batch_norm(trainable, spec, seed)
    target = weights_path(spec, weights_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.writing")
    if spec.architecture == "densenet121":
        setattr(network, UNTRAINED_MARKER, UNTRAINED_BANNER)
        torch.save(network, tmp)
    else:
        state = trainable.state_dict()
        setattr(state, UNTRAINED_MARKER, UNTRAINED_BANNER)
        torch.save(state, tmp)
    os.replace(tmp, target)
    return target


def _random_network(spec: ModelSpec):
    """(what is saved, the module whose forward we calibrate)."""
    import torch
    import torchvision
    import torchxrayvision as xrv

    if spec.architecture == "densenet121":
        net = xrv.models.DenseNet(num_classes=len(xrv.models.datasets.default_pathologies))
        return net, net
    if spec.architecture == "resnet50":
        net = torchvision.models.resnet50(num_classes=18, weights=None)
        net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return net, net
    jf = jfhealthcare_network(None)
    return jf, jf.model.module


def _calibrate_batch_norm(module, spec: ModelSpec, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    module.train()
    size = spec.resolution
    with torch.no_grad():
        for _ in range(2):
            coarse = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
            images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
            images = images * 1024
            if spec.architecture == "jfhealthcare-densenet121":
                module(images.repeat(1, 3, 1, 1) / 512)
            else:
                module(images)
    module.eval()
