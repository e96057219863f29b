"""What the worker processes of pool.py need, imported once by their fork server before it
forks them: the processes share these pages (copy-on-write) instead of each loading its own
copy. With PyPI's torch build, that is about 200 MB less per process beyond the first."""

import torch  # noqa: F401 - TorchXRayVision's resize (pipeline/convert.py)

from .pipeline import prepare  # noqa: F401 - pydicom, numpy
from .pipeline.srdocument import is_image_class
from .reportwriter import write_report  # noqa: F401 - highdicom

is_image_class("1.2.840.10008.5.1.4.1.1.1")  # highdicom reads its tables on first use
