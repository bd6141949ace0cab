"""Make the shared helpers importable: ``fault_support`` (here) and ``conversions_run`` (tests/integration)."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]
for _folder in (_TESTS / "faults", _TESTS / "integration"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))
