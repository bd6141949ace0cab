"""A real Airflow on one host for end-to-end tests: LocalExecutor on a SQLite metadata DB.

The same components as a deployment (api-server, scheduler, dag-processor as separate processes,
each with its own ``AIRFLOW_HOME``), as ``airflow standalone`` runs them, but without PostgreSQL,
Redis or Celery: the test runs wherever the rest of the suite runs. The state database is SQLite
too. Built on :class:`deployment.distributed.Deployment` (processes, REST API, diagnosis).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from tests.support.distributed import BIN, Deployment

_CELERY = ("AIRFLOW__CELERY__", "AIRFLOW__OPERATORS__DEFAULT_QUEUE")


@dataclass
class SingleHost(Deployment):
    """A LocalExecutor deployment under ``root`` (metadata DB ``root/airflow.db``, state DB ``root/state.db``)."""

    def environment(self, name: str, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in super().environment(name).items() if not key.startswith(_CELERY)}
        env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.root / 'airflow.db'}",
                "AIRFLOW_CONN_CAPI_STATE_DEFAULT": json.dumps({"conn_type": "sqlite", "host": str(self.root / "state.db")}),
                # Tasks start as soon as they are queued (the default waits up to 5 s per loop).
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            }
        )
        env.update(extra)
        return env

    def create_databases(self) -> None:
        """Nothing to create: SQLite files appear on first use."""

    def drop_databases(self) -> None:
        """Nothing to drop: the files go with ``root``."""

    def cli(self, *args: str, timeout: float = 300) -> str:
        """Run ``airflow <args>`` against this deployment's metadata DB; its output (it must succeed)."""
        done = subprocess.run(
            [str(BIN / "airflow"), *args], env=self.environment("cli"), capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        assert done.returncode == 0, f"airflow {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout
