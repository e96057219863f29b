"""Class activation maps (pipeline/cam.py): the wrapper's and the ONNX graph's maps equal a
direct torch computation, each map's spatial mean is its output's logit, the scores are left
exactly as they were, the maps follow the image (a blob flipped left-right), and the models
without exact maps say why."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from xrvd.pipeline.cam import WithMaps, architecture_of, cam_reference
from xrvd.pipeline.convert import prepare_file
from xrvd.pipeline.models import Classifier, MapsUnavailableError
from xrvd.pipeline.registry import MAPS_UNSUPPORTED, MODELS, get_spec

from ..harness import NIH_SC, RSNA_JPEG, WG04_CR, report_identity

DENSENET, RESNET, JF = ("densenet121-res224-rsna", "resnet50-res512-all",
                        "jfhealthcare-densenet121-res512")


def inputs(resolution: int) -> np.ndarray:
    """Real radiographs, converted as the daemon converts them."""
    return np.concatenate([prepare_file(path, resolution).array
                           for path in (WG04_CR, NIH_SC, RSNA_JPEG)])


def logits(network, batch: torch.Tensor) -> torch.Tensor:
    """The classifier's output before any sigmoid, taken from the network's own forward."""
    linear = network.classifier if architecture_of(network) == "densenet121" else \
        network.model.fc
    seen = []
    hook = linear.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.inference_mode():
            network(batch)
    finally:
        hook.remove()
    return seen[-1]


def test_support_is_plain_data_for_every_model():
    assert set(MAPS_UNSUPPORTED) == {spec.architecture for spec in MODELS.values()}
    supported = sorted(name for name, spec in MODELS.items() if spec.maps_unsupported is None)
    assert supported == sorted(name for name in MODELS if not name.startswith("jfhealthcare"))
    assert "AVG_MAX" in get_spec(JF).maps_unsupported


def test_a_model_without_exact_maps_says_why():
    from xrvd.pipeline.weights import jfhealthcare_network

    network = jfhealthcare_network(None)
    assert architecture_of(network) == JF.rsplit("-", 1)[0]
    with pytest.raises(MapsUnavailableError, match="AVG_MAX"):
        WithMaps(network)
    classifier = Classifier(get_spec(JF), network, report_identity(JF))
    assert "AVG_MAX" in classifier.maps_unavailable
    with pytest.raises(MapsUnavailableError, match="has no heatmaps"):
        classifier.predict_with_maps(np.zeros((1, 1, 512, 512), np.float32))


@pytest.mark.parametrize("name", [DENSENET, RESNET])
def test_maps_equal_a_direct_torch_computation_on_both_backends(name, ready_weights,
                                                                allow_untrained):
    """Within 1e-5 of the maps' scale: on real radiographs the random maps reach 10
    (DenseNet) and 60 (ResNet), where float32 holds about 7 digits, and PyTorch's own float32
    maps are 1e-5 (DenseNet) and 3e-4 (ResNet) from the exact (float64) ones. The graph, a
    different float32 computation, must be as close to the exact maps as PyTorch is."""
    spec = get_spec(name)
    folder = ready_weights(name, recorded=False)  # exported once per session, maps included
    eager = Classifier.load(name, folder, threads=1, backend="torch")
    fast = Classifier.load(name, folder, threads=1, backend="onnxruntime")
    assert (eager.backend, fast.backend) == ("torch", "onnxruntime")
    assert eager.maps_unavailable is None and fast.maps_unavailable is None
    network = eager.network
    batch = inputs(spec.resolution)
    x = torch.from_numpy(batch)
    with torch.inference_mode():
        scores, maps = WithMaps(network)(x)
        reference = cam_reference(network, x)
        exact = cam_reference(copy.deepcopy(network).double(), x.double())
        plain = network(x)
    grid = spec.resolution // 32
    assert maps.shape == (len(batch), 18, grid, grid)
    assert torch.equal(scores, plain)  # the scores are network(x) itself, bit for bit
    scale = max(1.0, float(reference.abs().max()))
    assert float((maps - reference).abs().max()) <= 1e-5 * scale
    # Each map's spatial mean is its output's logit (before the sigmoid and op_norm).
    assert float((maps.mean(dim=(2, 3)) - logits(network, x)).abs().max()) <= 1e-5 * scale
    assert reference.std(dim=(2, 3)).min() > 1e-3  # maps that vary: the comparison shows

    labels = [label.index for label in spec.labels]
    for classifier in (eager, fast):
        label_scores, label_maps = classifier.predict_with_maps(batch)
        assert label_maps.shape == (len(batch), len(labels), grid, grid)
        assert label_maps.dtype == label_scores.dtype == np.float32
        np.testing.assert_array_equal(label_scores, classifier.predict(batch))
    np.testing.assert_array_equal(eager.predict_with_maps(batch)[1], maps[:, labels].numpy())
    graph_maps = torch.from_numpy(fast.predict_with_maps(batch)[1]).double()
    exact, reference = exact[:, labels], reference[:, labels].double()
    float32_error = float((reference - exact).abs().max())
    assert float((graph_maps - exact).abs().max()) <= 2 * float32_error
    assert float((graph_maps - reference).abs().max()) <= 2 * float32_error


def blob_image(column: float, size: int = 224) -> np.ndarray:
    """A model input: smooth grey background, one bright round blob centred at (112, column)
    (continuous pixel coordinates). Symmetric, on a background that does not change
    left-right, so the image flipped left-right is the blob moved to size - column."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    background = -300.0 + 200.0 * (y / size)
    blob = 1500.0 * np.exp(-((y - 112.0) ** 2 + (x - column) ** 2) / (2 * 10.0 ** 2))
    return np.clip(background + blob, -1024, 1024).astype(np.float32)[None, None]


def test_the_hot_spot_mirrors_when_the_image_is_flipped(ready_weights, allow_untrained):
    """Random DenseNet features, a classifier row built from them to answer to the blob:
    the blob's features minus the same cell's without it. The map's hottest cell is the
    blob's, and it mirrors when the image is flipped left-right."""
    from xrvd.report.heatmap import map_to_image

    spec = get_spec(DENSENET)
    folder = ready_weights(DENSENET, recorded=False)
    network = copy.deepcopy(Classifier.load(DENSENET, folder, threads=1,
                                            backend="torch").network)
    image = blob_image(48.0)  # in cell column 1 of 7 (32 px each); mirrored: column 5
    assert np.array_equal(image[..., ::-1], blob_image(224.0 - 48.0))
    plain = blob_image(-1000.0)  # the background alone
    with torch.inference_mode():
        with_blob = torch.relu(network.features(torch.from_numpy(image)))[0, :, 3, 1]
        without = torch.relu(network.features(torch.from_numpy(plain)))[0, :, 3, 1]
        k = spec.labels[0].index
        network.classifier.weight[k] = with_blob - without
        network.classifier.bias[k] = 0.0
        wrapper = WithMaps(network)
        maps = [wrapper(torch.from_numpy(np.ascontiguousarray(x)))[1][0, k].numpy()
                for x in (image, image[..., ::-1])]
    hot = [np.unravel_index(m.argmax(), m.shape) for m in maps]
    assert hot == [(3, 1), (3, 5)]
    # And in the image's own geometry (the heatmap's), on a wide image cropped to its centre:
    # the hottest column mirrors (to the pixel the cell centres round to).
    columns = []
    for m in maps:
        values, inside = map_to_image(m, (300, 400), "crop", (300, 400))
        columns.append(int(np.argmax(np.where(inside, values, -np.inf).max(axis=0))))
    assert columns[0] < 200 < columns[1]
    assert abs((399 - columns[0]) - columns[1]) <= 2
