"""The envelope refresh run's summary: counts only, no identifiers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def build_refresh_summary(
    plan: Mapping[str, Any],
    slice_results: Iterable[Mapping[str, Any]],
    attempts: Mapping[str, Any],
    *,
    max_failure_ratio: float,
) -> dict[str, Any]:
    """Add up a refresh run: counts only, no identifiers.

    :param plan: the plan step's document (``as_of``, ``slices``, ``due``, ...).
    :param slice_results: one document per slice task that finished.
    :param attempts: :meth:`~liveramp_capi.state.envelope_store.EnvelopeStore.attempts_since` for the plan's ``as_of``.
    :param max_failure_ratio: the largest share of failed refreshes among attempted ones.
    """
    results = list(slice_results)
    reported = sorted(int(result["slice"]) for result in results)
    missing = sorted(set(range(int(plan["slices"]))) - set(reported))
    refreshed = int(attempts.get("refreshed", 0))
    failed = int(attempts.get("failed", 0))
    attempted = refreshed + failed
    ratio = failed / attempted if attempted else 0.0
    if ratio > max_failure_ratio:
        status = "failure_ratio_exceeded"
    elif missing:
        status = "incomplete"
    else:
        status = "complete"
    return {
        "run_date": plan.get("run_date"),
        "status": status,
        "as_of": plan.get("as_of"),
        "remaining_share": plan.get("remaining_share"),
        # Rows due when the run started; slices may see a few more written meanwhile.
        "selected": int(plan.get("due", 0)),
        "selected_by_slices": sum(int(result.get("selected", 0)) for result in results),
        "refreshed": refreshed,
        "failed": failed,
        "failed_by_reason": dict(attempts.get("failed_by_reason", {})),
        "skipped_consent": sum(int(result.get("skipped_consent", 0)) for result in results),
        "attempted": attempted,
        "failure_ratio": round(ratio, 4),
        "max_failure_ratio": max_failure_ratio,
        # Envelopes found already expired by this run: conversions of these users are held until
        # a fresher envelope arrives. By the state they were in: active (nothing refreshed them in
        # time), refresh_failed, consent_missing (never refreshable).
        "expired_when_found": int(plan.get("newly_expired", 0)),
        "expired_when_found_by_state": dict(plan.get("newly_expired_by_state", {})),
        "requests": sum(int(result.get("requests", 0)) for result in results),
        "retries": sum(int(result.get("retries", 0)) for result in results),
        "slices": {"planned": int(plan["slices"]), "reported": len(reported), "missing": missing},
    }
