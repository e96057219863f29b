"""The spool and the journal: the only package that touches either (see core.py)."""

from .core import Store
from .records import InstanceRow, NotStorableError, StoreError, StoreOutcome, StudyClaim
from .status import earlier_outcomes, read_status

__all__ = ["InstanceRow", "NotStorableError", "Store", "StoreError", "StoreOutcome",
           "StudyClaim", "earlier_outcomes", "read_status"]
