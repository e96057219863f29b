"""TorchXRayVision's own preprocessing path, the yardstick for xrvd's conversion (used by the
tests and by benchmarks/convert.py)."""

from pathlib import Path

import numpy as np
import torch


def reference(path: Path, resolution: int) -> np.ndarray:
    """TorchXRayVision's path: read_xray_dcm (or normalize(img, 255) for a bitmap, first
    channel), XRayCenterCrop, then the resize the model applies in fix_resolution."""
    import skimage.io
    import torchxrayvision as xrv

    if path.suffix == ".dcm":
        image = xrv.utils.read_xray_dcm(str(path))[None]
    else:
        image = xrv.datasets.normalize(skimage.io.imread(path), 255)
        image = (image[:, :, 0] if image.ndim > 2 else image)[None]
    image = xrv.datasets.XRayCenterCrop()(image)
    return xrv.utils.fix_resolution(torch.from_numpy(np.ascontiguousarray(image)),
                                    resolution, reference).numpy()
