"""Every model xrvd supports, as plain data.

This module imports nothing heavy (no torch) so that config validation and `xrvd models list`
stay fast. The tables mirror TorchXRayVision's `xrv.models.model_urls`; a test compares them
field by field, so a TorchXRayVision release that changes a model cannot drift silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import DEFAULT_MODEL, FINDING_NAMES, MODEL_NAMES  # noqa: F401 - DEFAULT_MODEL: re-exported
from ..errors import UnknownModelError

RELEASE_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"

# The 18 outputs of TorchXRayVision's core classifiers, in output order (config.py keeps the
# table, so that it can check the findings named in `model.thresholds` without the registry).
XRV_OUTPUTS = FINDING_NAMES
NAN = math.nan
# TorchXRayVision's DenseNet constructor unpickles a whole model (its DenseNet weights were
# saved with torch.save(model)); its ResNet and JF Healthcare loaders read state dicts.
PICKLED_MODEL_ARCHITECTURES = frozenset({"densenet121"})
# Heatmaps (class activation maps, pipeline/cam.py), per architecture: None where the map is
# exact (the network ends in global average pooling and one linear layer), else why not.
MAPS_UNSUPPORTED: dict[str, str | None] = {
    "densenet121": None,
    "resnet50": None,
    "jfhealthcare-densenet121": (
        "its head is not global average pooling and a linear layer: each finding's features "
        "are pooled by average and maximum at once (AVG_MAX), then batch-normalised; the "
        "maximum half has no share per image position, so no map's mean is the logit (its "
        "authors' own code makes logit maps for its other poolings, never for AVG_MAX)"),
}


@dataclass(frozen=True)
class Label:
    name: str
    index: int  # position in the network's output vector
    operating_point: float | None  # None: the model's output is a plain sigmoid


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str  # densenet121 | resnet50 | jfhealthcare-densenet121
    resolution: int
    weights_file: str
    trained_on: str
    labels: tuple[Label, ...]  # only the labels the model really predicts

    @property
    def weights_url(self) -> str:
        return RELEASE_URL + self.weights_file

    @property
    def pickled_model(self) -> bool:
        """True where the published file is a whole pickled model (`torch.save(model)`), not a
        state dict: what TorchXRayVision's own loaders expect of each architecture."""
        return self.architecture in PICKLED_MODEL_ARCHITECTURES

    @property
    def maps_unsupported(self) -> str | None:
        """Why this model has no heatmaps (class activation maps); None where it has them."""
        return MAPS_UNSUPPORTED[self.architecture]

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)


def _xrv_labels(names: list[str], op_threshs: list[float]) -> tuple[Label, ...]:
    """Keep what TorchXRayVision really predicts: a named output with a real operating point.
    An empty name or a NaN operating point means the training data had no such label."""
    return tuple(
        Label(name, index, thresh)
        for index, (name, thresh) in enumerate(zip(names, op_threshs, strict=True))
        if name and not math.isnan(thresh)
    )


def _masked(keep: set[int]) -> list[str]:
    return [name if i in keep else "" for i, name in enumerate(XRV_OUTPUTS)]


_CHEX_LIKE = _masked({0, 1, 3, 4, 7, 8, 10, 14, 15, 16, 17})

_DENSENETS = {
    "all": (
        "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        "NIH, PadChest, CheXpert, MIMIC-CXR (CheXpert labels), Google, OpenI, RSNA",
        list(XRV_OUTPUTS),
        [0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358,
         0.010060724, 0.103246614, 0.056810737, 0.026791653, 0.050318155, 0.023985857,
         0.01939503, 0.042889766, 0.053369623, 0.035975814, 0.20204692, 0.05015312],
    ),
    "nih": (
        "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        "NIH ChestX-ray14",
        _masked(set(range(14))),
        [0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932,
         0.012037827, 0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467,
         0.037198864, 0.0004403434, NAN, NAN, NAN, NAN],
    ),
    "pc": (
        "pc-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        "PadChest",
        _masked(set(range(14)) | {15}),
        [0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257,
         0.0023071, 0.055412333, 0.044385884, 0.042766232, 0.043258056, 0.037629247,
         0.005658899, 0.0091741895, NAN, 0.026507627, NAN, NAN],
    ),
    "chex": (
        "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        "CheXpert (Stanford)",
        _CHEX_LIKE,
        [0.1988969, 0.05710573, NAN, 0.0531293, 0.1435217, NAN, NAN, 0.27212676, 0.07749717,
         NAN, 0.19712369, NAN, NAN, NAN, 0.09932402, 0.09273402, 0.3270967, 0.10888247],
    ),
    "mimic_nb": (
        "mimic_nb-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        "MIMIC-CXR (NegBio labels)",
        _CHEX_LIKE,
        [0.08558747, 0.011884617, NAN, 0.0040595434, 0.010733786, NAN, NAN, 0.118761964,
         0.022924708, NAN, 0.06358637, NAN, NAN, NAN, 0.022143636, 0.017476924, 0.1258702,
         0.014020768],
    ),
    "mimic_ch": (
        "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        "MIMIC-CXR (CheXpert labels)",
        _CHEX_LIKE,
        [0.09121389, 0.010573786, NAN, 0.005023008, 0.003698257, NAN, NAN, 0.08001232,
         0.037242252, NAN, 0.05006329, NAN, NAN, NAN, 0.019866971, 0.03823637, 0.11303808,
         0.0069147074],
    ),
    "rsna": (
        "kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        "RSNA Pneumonia Challenge",
        _masked({8, 16}),
        [NAN] * 8 + [0.13486601] + [NAN] * 7 + [0.13511065, NAN],
    ),
}


def _build_registry() -> dict[str, ModelSpec]:
    specs = [
        ModelSpec(
            name=f"densenet121-res224-{key}",
            architecture="densenet121",
            resolution=224,
            weights_file=weights_file,
            trained_on=trained_on,
            labels=_xrv_labels(names, op_threshs),
        )
        for key, (weights_file, trained_on, names, op_threshs) in _DENSENETS.items()
    ]
    specs.append(
        ModelSpec(
            name="resnet50-res512-all",
            architecture="resnet50",
            resolution=512,
            weights_file="pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt",
            trained_on="PadChest, NIH, RSNA, SIIM, VinBrain",
            labels=_xrv_labels(
                list(XRV_OUTPUTS),
                [0.51570356, 0.50444704, 0.53787947, 0.50723547, 0.5025118, 0.5035252,
                 0.5038076, 0.51862943, 0.5078151, 0.50724894, 0.5056339, 0.510706, 0.5053923,
                 0.5020846, NAN, 0.5080557, 0.5138526, NAN],
            ),
        )
    )
    specs.append(
        ModelSpec(
            name="jfhealthcare-densenet121-res512",
            architecture="jfhealthcare-densenet121",
            resolution=512,
            weights_file="baseline_models_jfhealthcare-DenseNet121_pre_train.pth",
            trained_on="CheXpert (JF Healthcare baseline, Ye et al. 2020)",
            labels=tuple(
                Label(name, index, None)
                for index, name in enumerate(
                    ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Effusion")
                )
            ),
        )
    )
    return {spec.name: spec for spec in specs}


MODELS: dict[str, ModelSpec] = _build_registry()
if tuple(MODELS) != MODEL_NAMES:  # config validates names against its own list
    raise ImportError(f"the registry's models {tuple(MODELS)} differ from config.MODEL_NAMES")


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)} "
            "(`xrvd models list` shows them)"
        ) from None
