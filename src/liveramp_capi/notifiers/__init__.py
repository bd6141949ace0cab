"""Notifiers: how a failed partition, a failed refresh or a missed deadline reaches a human.

The default, :class:`LogNotifier`, writes one ``ERROR`` line to the Airflow log (no network, no
secret). Plug in another notifier without touching the DAGs by naming a factory in the
environment of every Airflow component (scheduler, dag-processor, workers, triggerer)::

    CAPI_FAILURE_NOTIFIER=my_company.alerts:capi_notifier   # a callable returning a BaseNotifier

or replace ``default_failure_notifier()`` in a DAG with any Airflow notifier, e.g.
``SlackNotifier(slack_conn_id="slack", text=..., channel=...)`` from
``apache-airflow-providers-slack`` or ``SmtpNotifier`` from ``apache-airflow-providers-smtp``.
"""

from __future__ import annotations

from liveramp_capi.notifiers.log import (
    DEFAULT_DEADLINE_MINUTES,
    LogNotifier,
    default_failure_notifier,
    partition_deadline_alert,
)

__all__ = ["DEFAULT_DEADLINE_MINUTES", "LogNotifier", "default_failure_notifier", "partition_deadline_alert"]
