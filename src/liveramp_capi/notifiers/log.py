"""The log-only default notifier, the pluggable factory, and the partition deadline alert."""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any

# airflow.sdk's type stub (3.3.2) lacks the deadline names its runtime exports.
from airflow.sdk import AsyncCallback, BaseNotifier, DeadlineAlert, DeadlineReference  # type: ignore[attr-defined]

#: Environment variable naming a factory of the failure notifier, ``module:callable`` or ``module.callable``.
NOTIFIER_FACTORY_ENV = "CAPI_FAILURE_NOTIFIER"
#: Environment variable holding the partition deadline, in minutes after the run was queued.
DEADLINE_MINUTES_ENV = "CAPI_PARTITION_DEADLINE_MINUTES"
#: Off unless configured (see :func:`partition_deadline_alert` for why); 360 suits the 03:00 UTC run.
DEFAULT_DEADLINE_MINUTES = 0

_LOG = logging.getLogger("liveramp_capi.alerts")
_MAX_ERROR_CHARS = 300


def _get(obj: Any, name: str) -> Any:
    """An attribute of an ORM/SDK object or a key of a dict (deadline callbacks get plain dicts)."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def describe(context: Mapping[str, Any] | None, title: str) -> str:
    """One line that says which partition needs attention, without a secret.

    Only identifiers (DAG, run, task, partition, try) and the exception's type and first
    characters are used: the project never puts a secret in an exception message, but a third-party
    library might print a URL, so the message is cut short.

    :param context: an Airflow context (task or DAG callback) or a deadline callback's context.
    :param title: what happened, e.g. ``"partition failed"``.
    """
    context = context or {}
    dag_run = context.get("dag_run")
    ti = context.get("ti") or context.get("task_instance")
    dag = context.get("dag")
    dag_id = _get(dag_run, "dag_id") or _get(dag, "dag_id") or _get(ti, "dag_id")
    run_id = _get(dag_run, "run_id") or _get(dag_run, "dag_run_id") or context.get("run_id")
    conf = _get(dag_run, "conf") or {}
    params = context.get("params") or {}
    partition = (
        (params.get("partition") if isinstance(params, Mapping) else None)
        or (conf.get("partition") if isinstance(conf, Mapping) else None)
        or _get(dag_run, "partition_key")
    )
    parts = [f"[capi] {title}", f"dag={dag_id}", f"run={run_id}"]
    if partition:
        parts.append(f"partition={partition}")
    if ti is not None:
        parts.append(f"task={_get(ti, 'task_id')}")
        map_index = _get(ti, "map_index")
        if map_index is not None and map_index >= 0:
            parts.append(f"map_index={map_index}")
        parts.append(f"try={_get(ti, 'try_number')}")
    deadline = context.get("deadline")
    if isinstance(deadline, Mapping) and deadline.get("deadline_time"):
        parts.append(f"deadline={deadline['deadline_time']}")
    error = context.get("exception")
    if error is not None:
        text = str(error)[:_MAX_ERROR_CHARS]
        parts.append(f"error={type(error).__name__}: {text}" if not isinstance(error, str) else f"error={text}")
    reason = context.get("reason")
    if reason:
        parts.append(f"reason={reason}")
    return " ".join(parts)


class LogNotifier(BaseNotifier):
    """Log-only notifier: one ``ERROR`` line naming the DAG, run, partition and task.

    Works as a task/DAG failure callback (``notify``, run by the worker or the dag-processor) and
    as a deadline-alert callback (``async_notify``, run by the triggerer). Pair it with log-based
    alerting, or replace it (see the package docstring).

    :param title: what happened, e.g. ``"partition failed"``.
    :param context: set by Airflow when the notifier is awaited as a deadline callback.
    """

    def __init__(self, title: str = "partition failed", context: Any = None) -> None:
        super().__init__(context=context)
        self.title = title

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        # Nothing to render, and rendering would need the DAG's Jinja environment, which the
        # serialized DAG handed to callbacks by ``airflow dags test`` does not have (Airflow 3.3:
        # "'SerializedDAG' object has no attribute 'get_template_env'"), so the alert itself failed.
        if self.template_fields:
            super().render_template_fields(context, jinja_env)

    def notify(self, context: Any) -> None:
        _LOG.error("%s", describe(context, self.title))

    async def async_notify(self, context: Any) -> None:
        self.notify(context)


def default_failure_notifier(title: str = "partition failed") -> BaseNotifier:
    """The notifier for ``on_failure_callback``: the factory named by ``CAPI_FAILURE_NOTIFIER``, else :class:`LogNotifier`.

    Usage in a DAG: ``DAG(..., on_failure_callback=default_failure_notifier("refresh failed"))``.

    :param title: what happened; passed to the factory as ``title=`` when it accepts it.
    :raises ImportError: when ``CAPI_FAILURE_NOTIFIER`` names something that cannot be imported
        (a broken alerting setup must show up as a DAG import error, not as silence).
    """
    path = os.environ.get(NOTIFIER_FACTORY_ENV, "").strip()
    if not path:
        return LogNotifier(title)
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    factory = getattr(importlib.import_module(module_name), attr)
    try:
        notifier: BaseNotifier = factory(title=title)
    except TypeError:
        notifier = factory()
    return notifier


def _deadline_minutes(env: str = DEADLINE_MINUTES_ENV) -> float:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return float(DEFAULT_DEADLINE_MINUTES)
    minutes = float(raw)
    if minutes < 0:
        raise ValueError(f"{env} must be a number of minutes (0: no deadline alert)")
    return minutes


def partition_deadline_alert(minutes: float | None = None, *, env: str = DEADLINE_MINUTES_ENV) -> DeadlineAlert | None:
    """A deadline alert that flags a run not finished ``minutes`` after it was queued, or ``None`` when off.

    ``CAPI_PARTITION_DEADLINE_MINUTES`` sets it (e.g. 360: the 03:00 UTC run must be done by
    09:00 UTC); unset or ``0``: no alert. It is opt-in because of two Airflow 3.3.2 limitations:

    * partition runs (``CronPartitionTimetable``, manual runs) have no logical date, so only the
      ``DAGRUN_QUEUED_AT`` reference yields a deadline for them;
    * clearing a task of a run whose ``DAGRUN_QUEUED_AT`` deadline is still pending fails with a
      500 (``_recalculate_dagrun_queued_at_deadlines`` reads the JSON-stored interval as seconds).
      With the alert on, rerun a failed partition by triggering a new run for it (the ledger
      makes that safe) until the deadline has passed.

    ``dag.test()`` / ``airflow dags test`` (3.3.2) also crash when a run with a deadline succeeds.
    The callback is :class:`LogNotifier`, run in the triggerer, which must therefore be running.

    :param minutes: overrides the environment / default; ``0`` means no alert.
    :param env: the environment variable read (the hourly DAG has its own).
    """
    minutes = minutes if minutes is not None else _deadline_minutes(env)
    if minutes == 0:
        return None
    interval = dt.timedelta(minutes=minutes)
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=interval,
        callback=AsyncCallback(LogNotifier, kwargs={"title": "partition not finished by its deadline"}),
        name="partition_deadline",
    )
