"""Counters and timers for the tools operators already watch, through Airflow's ``Stats``
(StatsD, Datadog or OpenTelemetry, as ``[metrics]`` configures; nothing is sent when metrics
are off). One call per operator; the names are the public interface (README, "Metrics").

Only counts and durations leave here: no identifier, no partition name (unbounded label
values would grow the metric store). A reason code is part of the name (StatsD) and a tag.
A metric that cannot be sent never fails a task.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "capi"
_REASON = re.compile(r"[^a-z0-9_]+")


def _stats() -> Any:
    from airflow.sdk.observability.stats import Stats

    return Stats


def _incr(name: str, count: int, tags: Mapping[str, str] | None = None) -> None:
    if count > 0:
        _stats().incr(f"{PREFIX}.{name}", count, tags=dict(tags) if tags else None)


def _reason(code: str) -> str:
    return _REASON.sub("_", str(code).lower()).strip("_")[:60] or "unknown"


def _safely(emit: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            emit(*args, **kwargs)
        except Exception as exc:  # metrics are best effort: never fail a delivery for them
            log.warning("metrics not emitted (%s): %s", emit.__name__, type(exc).__name__)

    wrapper.__name__ = emit.__name__
    wrapper.__doc__ = emit.__doc__
    return wrapper


@_safely
def validated(tally: Mapping[str, Any]) -> None:
    """The validate step's tally: ``capi.events.received|valid|duplicates|rejected[.<reason>]``."""
    for name in ("read", "valid", "duplicates", "rejected"):
        _incr(f"events.{'received' if name == 'read' else name}", int(tally.get(name, 0)))
    for code, count in dict(tally.get("rejected_by_code", {})).items():
        reason = _reason(code)
        _incr(f"events.rejected.{reason}", int(count), {"reason": reason})


@_safely
def delivered(counts: Mapping[str, int], stats: Any) -> None:
    """One send shard: events delivered / failed / held back, requests, 429s, retries, send time.

    :param counts: the shard's counters (``delivered_events``, ``failed_events``, ...).
    :param stats: the sender's :class:`~liveramp_capi.delivery.sender.DeliveryStats`.
    """
    _incr("events.delivered", int(counts.get("delivered_events", 0)))
    _incr("events.failed", int(counts.get("failed_events", 0)))
    _incr("events.envelope_expired", int(counts.get("envelope_expired_events", 0)))
    _incr("batches.failed", int(counts.get("failed_batches", 0)))
    _request_metrics("requests", stats)
    elapsed = float(getattr(stats, "elapsed_seconds", 0.0) or 0.0)
    if elapsed > 0:
        _stats().timing(f"{PREFIX}.send.duration", elapsed * 1000.0)


def _request_metrics(name: str, stats: Any) -> None:
    statuses = dict(getattr(stats, "status_counts", {}) or {})
    _incr(name, int(getattr(stats, "requests", 0)))
    _incr(f"{name}.retries", int(getattr(stats, "retries", 0)))
    _incr(f"{name}.throttled", int(statuses.get(429, 0)))
    _incr(f"{name}.server_errors", sum(int(n) for status, n in statuses.items() if int(status) >= 500))


@_safely
def envelopes_refreshed(stats: Any) -> None:
    """One refresh slice: ``capi.envelopes.refreshed|refresh_failed[.<reason>]|skipped_consent`` and requests."""
    _incr("envelopes.refreshed", int(getattr(stats, "refreshed", 0)))
    _incr("envelopes.refresh_failed", int(getattr(stats, "failed", 0)))
    for code, count in dict(getattr(stats, "failed_by_reason", {}) or {}).items():
        reason = _reason(code)
        _incr(f"envelopes.refresh_failed.{reason}", int(count), {"reason": reason})
    _incr("envelopes.skipped_consent", int(getattr(stats, "skipped_consent", 0)))
    _request_metrics("envelope_requests", stats)


@_safely
def envelopes_expired(count: int) -> None:
    """Rows the refresh plan found expired: ``capi.envelopes.expired``."""
    _incr("envelopes.expired", int(count))
