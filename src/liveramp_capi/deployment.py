"""Small hooks for running Airflow itself: a hostname callable for workers on one machine."""

from __future__ import annotations

import os
import socket

#: Environment variable that names a worker; several Celery workers on one host stay distinguishable.
HOSTNAME_ENV = "CAPI_WORKER_HOSTNAME"


def hostname() -> str:
    """The host name Airflow records on a task instance: ``$CAPI_WORKER_HOSTNAME`` or the FQDN.

    Wire it with ``AIRFLOW__CORE__HOSTNAME_CALLABLE=liveramp_capi.deployment.hostname``; the
    default FQDN is what Airflow itself uses, so this changes nothing unless the variable is set.
    """
    return os.environ.get(HOSTNAME_ENV) or socket.getfqdn()
