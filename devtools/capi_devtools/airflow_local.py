"""`make airflow`: the Airflow UI on one machine, on the embedded default (``airflow standalone``).

Like ``make demo`` but with the whole of Airflow running: a SQLite metadata DB under
``.airflow/``, the api-server (UI) on http://localhost:8080, scheduler, dag-processor and
triggerer, this repository's ``dags/``, the local stand-in of LiveRamp's endpoints (NOT LiveRamp;
it records what it receives) and the sample partition staged for yesterday. Trigger
``tiktok_conversions`` from the UI with the param ``partition`` = the day printed below.

The connections (CAPI adapter, envelope API, state database) and Variables are created in the
metadata database on first start, so they are visible and editable in Admin > Connections /
Variables like in production (an edit there is what the next run uses; "Test connection" is
enabled because everything here is local). Later starts keep the user's edits and only move the
stand-in connections to the stand-in's new port when the old one is taken.

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

from capi_devtools import REPO
from capi_devtools.console_demo import STANDIN_ARGS, stage_refused_partition
from capi_devtools.sample_partition import stage_sample_partition
from capi_devtools.standin_fixture import STANDIN_SCRIPT

HOME = REPO / ".airflow"
BIN = Path(sys.executable).parent

STANDIN_CONFIG_ID = "cfg-local"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _standin_port() -> int:
    """The stand-in's port: the one of the last start when it is free, so the connections stay valid."""
    remembered = HOME / "standin.port"
    if remembered.exists():
        port = int(remembered.read_text())
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                pass
    port = _free_port()
    remembered.write_text(str(port))
    return port


def connections(standin_port: int) -> dict[str, dict]:
    """The local connections, as Airflow's connection JSON, by connection id.

    :param standin_port: where the stand-in listens on 127.0.0.1.
    """
    standin = f"http://127.0.0.1:{standin_port}"
    return {
        "liveramp_capi_default": {
            "conn_type": "liveramp_capi",
            "host": standin,
            "password": STANDIN_CONFIG_ID,
            "extra": {"concurrency": 32, "timeout_seconds": 5, "max_attempts": 4},
        },
        # pid and origin are placeholders the stand-in accepts.
        "liveramp_envelope_default": {
            "conn_type": "liveramp_envelope",
            "host": standin,
            "extra": {"pid": "local-placement", "origin": "https://yourwebshop.com", "concurrency": 16},
        },
        "capi_state_default": {"conn_type": "sqlite", "host": str(HOME / "state.db")},
    }


def variables() -> dict[str, str]:
    """The local Variables: landing and output roots under ``.airflow/``, and the sample's reject share."""
    return {
        "capi_landing_root": f"file://{HOME / 'landing'}",
        "capi_output_root": f"file://{HOME / 'output'}",
        # The sample holds a handful of deliberately invalid records among ~60.
        "capi_max_invalid_ratio": "0.25",
    }


def environment(api_port: int = 8080) -> dict[str, str]:
    """The environment of ``airflow standalone`` and of the seeding step: Airflow home, DAGs, UI.

    Connections and Variables are NOT environment variables here (Airflow would hide them from the
    UI and ignore edits made there): :func:`seed_metadata` writes them to the metadata database.

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
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{HOME / 'home' / 'airflow.db'}",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            # Every endpoint here is local (the stand-in, a SQLite file): testing a connection from
            # the UI reaches nothing outside this machine. Leave it disabled in production unless
            # the UI's users may make the workers open arbitrary connections.
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
        }
    )
    for name in list(env):
        # A connection or Variable from the caller's shell would shadow the metadata database's.
        if name.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_")):
            del env[name]
    return env


_SEED = """
import json, sys
from airflow.models import Connection, Variable
from airflow.utils.session import create_session

wanted = json.loads(sys.argv[1])
with create_session() as session:
    for conn_id, spec in wanted["connections"].items():
        found = session.query(Connection).filter(Connection.conn_id == conn_id).one_or_none()
        if found is None:
            session.add(Connection(conn_id=conn_id, conn_type=spec["conn_type"], host=spec["host"],
                                   password=spec.get("password"), extra=json.dumps(spec.get("extra") or {})))
            print(f"  created connection {conn_id}")
        elif found.host and found.host.startswith("http://127.0.0.1:") and found.host != spec["host"]:
            found.host = spec["host"]  # the stand-in moved to another port; the user's other edits stay
            print(f"  connection {conn_id}: host moved to the stand-in's new port")
    for key, value in wanted["variables"].items():
        if Variable.get(key, default_var=None) is None:
            Variable.set(key, value)
            print(f"  created Variable {key}")
"""


def seed_metadata(env: dict[str, str], standin_port: int) -> None:
    """Migrate the metadata DB and create the local connections and Variables the user has not got.

    :param env: from :func:`environment`.
    :param standin_port: where the stand-in listens.
    """
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    wanted = {
        "connections": connections(standin_port),
        "variables": variables(),
    }
    subprocess.run([sys.executable, "-c", _SEED, json.dumps(wanted)], env=env, check=True)


def main() -> int:
    (HOME / "home").mkdir(parents=True, exist_ok=True)
    standin_port = _standin_port()
    partition = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    stage_sample_partition(HOME / "landing", partition)
    # The day before: a partition whose extra event the stand-in refuses (the console's failed demo).
    refused = (dt.date.fromisoformat(partition) - dt.timedelta(days=1)).isoformat()
    stage_refused_partition(HOME / "landing", refused)
    standin = subprocess.Popen(
        [sys.executable, str(STANDIN_SCRIPT), "--port", str(standin_port),
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
        env = environment()
        seed_metadata(env, standin_port)
        airflow = subprocess.Popen([str(BIN / "airflow"), "standalone"], env=env)
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
