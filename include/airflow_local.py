"""`make airflow`: the Airflow UI on one machine, on the embedded default (``airflow standalone``).

Like ``make demo`` but with the whole of Airflow running: a SQLite metadata DB under
``.airflow/``, the api-server (UI) on http://localhost:8080, scheduler, dag-processor and
triggerer, this repository's ``dags/``, the local stand-in of LiveRamp's endpoints (NOT LiveRamp;
it records what it receives) and the sample partition staged for yesterday. Trigger
``tiktok_conversions`` from the UI with the param ``partition`` = the day printed below.

Stop with Ctrl-C: the stand-in and Airflow stop together. The Airflow home is kept between runs
(delete ``.airflow/`` to start over).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOME = REPO / ".airflow"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "include"))

from console_demo import STANDIN_ARGS, stage_refused_partition  # noqa: E402
from sample_partition import stage_sample_partition  # noqa: E402

STANDIN_CONFIG_ID = "cfg-local"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(standin_port: int, api_port: int = 8080) -> dict[str, str]:
    """The environment of ``airflow standalone``: Airflow home, DAGs, connections, Variables.

    :param standin_port: where the stand-in listens on 127.0.0.1.
    :param api_port: the UI / API port.
    """
    env = os.environ.copy()
    env.update(
        {
            # `airflow standalone` starts its components as `airflow ...` subprocesses.
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "AIRFLOW_HOME": str(HOME / "home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT": json.dumps(
                {
                    "conn_type": "liveramp_capi",
                    "host": f"http://127.0.0.1:{standin_port}",
                    "password": STANDIN_CONFIG_ID,
                    "extra": {"concurrency": 32, "timeout_seconds": 5, "max_attempts": 4},
                }
            ),
            "AIRFLOW_CONN_CAPI_STATE_DEFAULT": json.dumps({"conn_type": "sqlite", "host": str(HOME / "state.db")}),
            "AIRFLOW_VAR_CAPI_LANDING_ROOT": f"file://{HOME / 'landing'}",
            "AIRFLOW_VAR_CAPI_OUTPUT_ROOT": f"file://{HOME / 'output'}",
            # The sample holds a handful of deliberately invalid records among ~60.
            "AIRFLOW_VAR_CAPI_MAX_INVALID_RATIO": "0.25",
            "CAPI_SCHEMA_PATH": str(REPO / "include" / "schemas" / "tiktok_event.schema.json"),
        }
    )
    return env


def main() -> int:
    (HOME / "home").mkdir(parents=True, exist_ok=True)
    standin_port = _free_port()
    partition = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    stage_sample_partition(HOME / "landing", partition)
    # The day before: a partition whose extra event the stand-in refuses (the console's failed demo).
    refused = (dt.date.fromisoformat(partition) - dt.timedelta(days=1)).isoformat()
    stage_refused_partition(HOME / "landing", refused)
    standin = subprocess.Popen(
        [sys.executable, str(REPO / "include" / "liveramp_standin.py"), "--port", str(standin_port),
         "--config-id", STANDIN_CONFIG_ID, "--latency-ms", "20", *STANDIN_ARGS],
        stdout=subprocess.DEVNULL,
    )
    passwords = HOME / "home" / "simple_auth_manager_passwords.json.generated"
    print(
        "\n".join(
            [
                "Starting Airflow standalone (api-server, scheduler, dag-processor, triggerer; SQLite) ...",
                f"  stand-in of LiveRamp (NOT LiveRamp): http://127.0.0.1:{standin_port}/_standin/stats",
                f"  sample partition staged: {HOME.relative_to(REPO)}/landing/dt={partition}/",
                "  UI:       http://localhost:8080  (ready when the log says the api-server is up)",
                "  login:    admin",
                f"  password: generated on first start, in {passwords.relative_to(REPO)}",
                f"  then:     unpause tiktok_conversions and trigger it with partition = {partition};",
                f"            results land in {HOME.relative_to(REPO)}/output/dt={partition}/summary.json",
                f"  console:  menu Conversions; a failed partition to see there: trigger {refused} (one batch refused)",
                "  stop:     Ctrl-C",
            ]
        ),
        flush=True,
    )
    airflow: subprocess.Popen[bytes] | None = None
    try:
        airflow = subprocess.Popen([str(BIN / "airflow"), "standalone"], env=environment(standin_port))
        return airflow.wait()
    except KeyboardInterrupt:
        if airflow is None:
            return 130
        # Ctrl-C reached the whole foreground group already; give standalone time to stop its
        # components, then make sure it does.
        try:
            return airflow.wait(timeout=30)
        except subprocess.TimeoutExpired:
            airflow.send_signal(signal.SIGTERM)
            try:
                return airflow.wait(timeout=30)
            except subprocess.TimeoutExpired:
                airflow.kill()
                return airflow.wait()
    finally:
        standin.terminate()
        standin.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
