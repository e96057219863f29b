"""Imported once by the fork server of pool.py's worker processes before it forks them: what
they need is loaded here, and the processes share these pages (copy-on-write) instead of each
loading its own copy (pydicom, numpy, the decoders, highdicom: no torch)."""

from .pipeline import prepare  # noqa: F401 - pydicom, numpy
from .pool import load_libraries
from .report.files import write_report  # noqa: F401 - highdicom

load_libraries()
