from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from standin_fixture import StandInProcess, running_standin


@pytest.fixture
def standin() -> Iterator[StandInProcess]:
    """A fresh local LiveRamp stand-in subprocess (see tests/standin_fixture.py)."""
    with running_standin() as handle:
        yield handle
