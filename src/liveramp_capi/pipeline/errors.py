"""How a pipeline step reports that it failed, without knowing who runs it."""

from __future__ import annotations


class StepFailed(Exception):
    """The step failed; a retry of the task may heal it (a database or network outage)."""


class PermanentStepFailure(StepFailed):
    """The step failed for a reason no retry heals (a refused configuration, too many rejects)."""
