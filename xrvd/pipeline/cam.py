"""Class activation maps: where in the image a model found its evidence for each finding,
computed by the network itself, exactly (full install: needs torch).

TorchXRayVision's DenseNet-121 and ResNet-50 end in global average pooling and one linear
layer: logit_k = b_k + W_k . mean_p f(p), where f(p) is the last feature vector at position p
of an h x w grid (DenseNet: the ReLU of norm5, 7 x 7 at 224 px; ResNet: layer4's output,
16 x 16 at 512 px). A linear map commutes with the mean, so

    map_k(p) = b_k + W_k . f(p)        and        mean_p map_k(p) = logit_k

exactly: each position's share of the finding's logit (the CAM of Zhou et al. 2016, with the
bias spread evenly so that the mean property holds). Maps are in logit space, before the
sigmoid and TorchXRayVision's operating-point normalisation, so positive values push towards
the finding and negative ones away from it. Which architectures have maps, and why the others
have not, is plain data in registry.MAPS_UNSUPPORTED.

`WithMaps(network)` is what is exported to ONNX (onnxrt.py: the graph's second output,
`maps`) and what the torch backend runs; `cam_reference` is an independent computation of the
same maps for the tests.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .models import MapsUnavailableError


def architecture_of(network) -> str:
    """The registry's architecture name of a loaded TorchXRayVision network."""
    import torchxrayvision as xrv

    if isinstance(network, xrv.models.DenseNet):
        return "densenet121"
    if isinstance(network, xrv.models.ResNet):
        return "resnet50"
    # Not imported to compare: importing the JF Healthcare package changes sys.path.
    if type(network).__module__.startswith("torchxrayvision.baseline_models.jfhealthcare"):
        return "jfhealthcare-densenet121"
    return type(network).__name__


def unsupported_reason(network) -> str | None:
    from .registry import MAPS_UNSUPPORTED

    architecture = architecture_of(network)
    return MAPS_UNSUPPORTED.get(architecture, f"{architecture} is not an architecture xrvd "
                                "knows the last feature maps of")


class WithMaps(torch.nn.Module):
    """`network` returning (scores, maps): scores exactly as `network(x)` computes them (it
    is `network(x)`, run once), and maps (N, outputs, h, w) in logit space, the classifier's
    weights and bias applied at every position of the last feature maps, so that each map's
    spatial mean is its output's logit. Raises MapsUnavailableError for an architecture
    without exact maps."""

    def __init__(self, network):
        super().__init__()
        reason = unsupported_reason(network)
        if reason is not None:
            raise MapsUnavailableError(f"{architecture_of(network)} has no heatmaps: {reason}")
        self.network = network
        if architecture_of(network) == "densenet121":
            # features2 applies an (in-place) ReLU to norm5's output before pooling
            head = (network.features, network.classifier, True)
        else:
            head = (network.model.layer4, network.model.fc, False)
        # A tuple, not attributes: the modules stay registered under `network` only.
        self._head = head
        # A new module is in training mode, and the ONNX exporter restores the mode it found
        # on the whole tree afterwards: the network would be left batch-normalising per batch.
        self.train(network.training)

    def forward(self, x):
        features_module, linear, relu = self._head
        captured = []
        # The hook takes the features from the network's own forward pass: the scores are
        # network(x) itself, and the feature maps are computed once for both outputs.
        hook = features_module.register_forward_hook(
            lambda module, args, output: captured.append(output))
        try:
            scores = self.network(x)
        finally:
            hook.remove()
        features = captured[-1]
        if relu:
            features = F.relu(features)
        maps = F.conv2d(features, linear.weight[:, :, None, None], linear.bias)
        return scores, maps


def cam_reference(network, x: torch.Tensor) -> torch.Tensor:
    """The maps computed directly, without WithMaps: the features recomputed layer by layer
    and the classifier applied with an einsum. x at the model's native resolution."""
    import torchxrayvision as xrv

    if isinstance(network, xrv.models.DenseNet):
        features = torch.relu(network.features(x))
        linear = network.classifier
    elif isinstance(network, xrv.models.ResNet):
        m = network.model
        out = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        features = m.layer4(m.layer3(m.layer2(m.layer1(out))))
        linear = m.fc
    else:
        raise MapsUnavailableError(f"no maps for {architecture_of(network)}")
    return (torch.einsum("kc,nchw->nkhw", linear.weight, features)
            + linear.bias[None, :, None, None])


def torch_scores_and_maps(network, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WithMaps(network) on a numpy batch: (scores, maps) as float32 arrays."""
    wrapper = WithMaps(network)
    with torch.inference_mode():
        scores, maps = wrapper(torch.from_numpy(np.ascontiguousarray(batch)).to(
            next(network.parameters()).device))
    return scores.float().cpu().numpy(), maps.float().cpu().numpy()


def check_graph_maps(runner, network, batch: np.ndarray, log) -> tuple[float, float]:
    """The export check of an ONNX graph's maps (onnxrt.build): (the largest difference from
    PyTorch's maps on the check batch, whole and its first image alone, and the bound it must
    keep, onnxrt.maps_tolerance). Maps that differ are logged: the graph still scores."""
    from .onnxrt import max_abs_diff, maps_tolerance

    reference = torch_scores_and_maps(network, batch)[1]
    difference = max(max_abs_diff(runner.run_with_maps(batch)[1], reference),
                     max_abs_diff(runner.run_with_maps(batch[:1])[1], reference[:1]))
    bound = maps_tolerance(reference)
    if not difference <= bound:
        log.warning("model.maps_differ", max_abs_diff=difference, tolerance=bound,
                    detail="the graph scores, but serves no heatmaps; backend torch has them")
    return difference, bound
