"""A real distributed Airflow deployment on this machine, without Docker, for the end-to-end test.

Metadata DB on PostgreSQL (a fresh database, dropped afterwards), CeleryExecutor on Redis (a
dedicated DB number, flushed before and after), and scheduler, dag-processor, api-server and
Celery workers as separate processes, each with its own ``AIRFLOW_HOME`` and its whole
configuration in environment variables. Every process is started in its own session so that it
can be stopped with its children (Celery pool processes, task supervisors).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
#: A Redis DB number nobody else on the machine uses; flushed before and after.
REDIS_DB = 13

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0,
             diagnose: Callable[[], str] | None = None, abort: Callable[[], str | None] | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` (and a diagnosis) after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if abort is not None and (reason := abort()):
            raise AssertionError(f"gave up waiting for {what}: {reason}\n{diagnose() if diagnose else ''}")
        try:
            value = check()
            if value:
                return value
        except Exception as err:
            last_error = err
        time.sleep(interval)
    detail = diagnose() if diagnose else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r})\n{detail}")


@dataclass
class Component:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    killed: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the component and every process it started (its session's process group)."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, grace: float = 20.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Children (Celery pool processes, task supervisors) may outlive their parent.
        self.kill(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@dataclass
class Deployment:
    root: Path
    standin_url: str
    standin_config_id: str
    events_per_shard: int = 40
    suffix: str = field(default_factory=lambda: secrets.token_hex(4))
    api_port: int = field(default_factory=free_port)
    components: dict[str, Component] = field(default_factory=dict)
    _token: str | None = None

    @property
    def metadata_db(self) -> str:
        return f"capi_e2e_airflow_{self.suffix}"

    @property
    def state_db(self) -> str:
        return f"capi_e2e_state_{self.suffix}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- environment --------------------------------------------------------------------------
    def environment(self, name: str, **extra: str) -> dict[str, str]:
        """The environment of one component: its own AIRFLOW_HOME, everything else shared."""
        # The pytest process carries its own (SQLite) Airflow settings: none may leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CAPI_"))}
        home = self.root / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        db = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.metadata_db}"
        env.update(
            {
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db,
                "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{db}",
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
                # A queue of this run's own: workers orphaned by an earlier, killed test run
                # (still listening on the same Redis DB) cannot take its tasks.
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": f"capi-e2e-{self.suffix}",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api}/execution/",
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "liveramp_capi.deployment.hostname",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API_AUTH__JWT_SECRET": "e2e-" + self.suffix * 8,
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.root / "logs"),
                # Only the runs this test triggers: no scheduled partition run of its own.
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                # A killed worker's tasks are noticed within a minute, not five.
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT": json.dumps(
                    {
                        "conn_type": "liveramp_capi",
                        "host": self.standin_url,
                        "password": self.standin_config_id,
                        # Few requests in flight: a shard takes long enough to be interrupted.
                        "extra": {"concurrency": 2, "timeout_seconds": 10, "max_attempts": 4,
                                  "backoff_base_seconds": 0.1, "backoff_max_seconds": 0.5},
                    }
                ),
                "AIRFLOW_CONN_CAPI_STATE_DEFAULT": json.dumps(
                    {"conn_type": "postgres", "host": PG_HOST, "port": PG_PORT, "login": PG_USER,
                     "schema": self.state_db}
                ),
                "AIRFLOW_VAR_CAPI_LANDING_ROOT": f"file://{self.root / 'landing'}",
                "AIRFLOW_VAR_CAPI_OUTPUT_ROOT": f"file://{self.root / 'output'}",
                "AIRFLOW_VAR_CAPI_MAX_INVALID_RATIO": "0.25",
                "AIRFLOW_VAR_CAPI_EVENTS_PER_SHARD": str(self.events_per_shard),
                # A second run of a partition waits for the first one's claim; ask every 2 s.
                "AIRFLOW_VAR_CAPI_PARTITION_CLAIM_POLL_SECONDS": "2",
                # Off: Airflow 3.3.2 cannot clear tasks of a run with a pending queued-at deadline.
                "CAPI_PARTITION_DEADLINE_MINUTES": "0",
            }
        )
        env.update(extra)
        return env

    # -- databases ----------------------------------------------------------------------------
    def create_databases(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as conn:
            for name in (self.metadata_db, self.state_db):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_databases(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as conn:
            for name in (self.metadata_db, self.state_db):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    @staticmethod
    def flush_redis() -> None:
        import redis

        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=10)
        try:
            client.flushdb()
        finally:
            client.close()

    # -- processes ----------------------------------------------------------------------------
    def migrate(self) -> None:
        log = self.root / "migrate.log"
        with log.open("wb") as out:
            code = subprocess.run(
                [str(BIN / "airflow"), "db", "migrate"], env=self.environment("migrate"),
                stdout=out, stderr=subprocess.STDOUT, timeout=600, check=False,
            ).returncode
        assert code == 0, f"airflow db migrate failed:\n{log.read_text(errors='replace')[-3000:]}"

    def start(self, name: str, *args: str, **extra_env: str) -> Component:
        log_path = self.root / f"{name}.log"
        out = log_path.open("wb")
        process = subprocess.Popen(
            [str(BIN / "airflow"), *args], env=self.environment(name, **extra_env),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        out.close()
        component = Component(name, process, log_path)
        self.components[name] = component
        return component

    def start_worker(self, name: str) -> Component:
        return self.start(
            name, "celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency", "2",
            CAPI_WORKER_HOSTNAME=name,
            # Two workers on one host: each serves its task logs on its own port.
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        )

    def stop_all(self) -> None:
        for component in reversed(list(self.components.values())):
            component.stop()

    def dead(self) -> str | None:
        """Which component exited unexpectedly (a worker killed on purpose is removed from the list)."""
        dead = [c.name for c in self.components.values() if not c.alive() and not getattr(c, "killed", False)]
        return f"components exited: {dead}" if dead else None

    def diagnose(self) -> str:
        return "\n".join(
            f"--- {c.name} ({'alive' if c.alive() else f'exited {c.process.returncode}'}) ---\n{c.log_tail(1500)}"
            for c in self.components.values()
        )

    # -- REST API -----------------------------------------------------------------------------
    def _token_header(self) -> dict[str, str]:
        if self._token is None:
            # With SIMPLE_AUTH_MANAGER_ALL_ADMINS the token endpoint hands out an admin token.
            request = urllib.request.Request(f"{self.api}/auth/token", method="GET")
            with _OPENER.open(request, timeout=30) as response:
                self._token = json.loads(response.read())["access_token"]
        return {"Authorization": f"Bearer {self._token}"}

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.api}/api/v2{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json", **self._token_header()})
        try:
            with _OPENER.open(request, timeout=60) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{method} {path} -> {err.code}: {err.read()[:500]!r}") from None

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        run = self.call("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=500")["task_instances"]

    def clear(self, dag_id: str, run_id: str, task_ids: list[Any]) -> list[dict[str, Any]]:
        body = {"dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "only_failed": False,
                "include_downstream": True, "reset_dag_runs": True}
        return self.call("POST", f"/dags/{dag_id}/clearTaskInstances", body)["task_instances"]
