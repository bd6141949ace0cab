"""`make airflow` puts its connections and Variables in the metadata database, where the UI edits them.

Runs the real seeding step (``airflow db migrate`` and the ORM writes) against a throw-away
Airflow home, then reads the metadata database back with sqlite3.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from capi_devtools import airflow_local

pytestmark = pytest.mark.airflow


def _load_airflow_local(home: Path):
    spec = importlib.util.spec_from_file_location("airflow_local_under_test", Path(airflow_local.__file__))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.HOME = home
    return module


_READ = """
import json
from airflow.models import Connection
from airflow.utils.session import create_session

with create_session() as session:
    print(json.dumps({c.conn_id: {"conn_type": c.conn_type, "host": c.host, "extra": c.extra_dejson}
                      for c in session.query(Connection)}))
"""


def _connections(env: dict[str, str]) -> dict[str, dict]:
    """The connections as Airflow reads them (extras are encrypted at rest)."""
    done = subprocess.run([sys.executable, "-c", _READ], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_seeding_creates_editable_connections_and_keeps_the_users_edits(tmp_path, monkeypatch) -> None:
    home = tmp_path / ".airflow"
    (home / "home").mkdir(parents=True)
    local = _load_airflow_local(home)
    # A connection in the caller's shell must not shadow the metadata database's.
    monkeypatch.setenv("AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT", "http://shadow")
    env = local.environment()
    assert "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT" not in env
    assert env["AIRFLOW__CORE__TEST_CONNECTION"] == "Enabled"

    local.seed_metadata(env, standin_port=40001)

    found = _connections(env)
    assert set(found) >= {"liveramp_capi_default", "liveramp_envelope_default", "capi_state_default"}
    assert found["liveramp_capi_default"]["conn_type"] == "liveramp_capi"
    assert found["liveramp_capi_default"]["host"] == "http://127.0.0.1:40001"
    assert found["liveramp_envelope_default"]["extra"]["pid"]
    landing = subprocess.run(
        [local.BIN / "airflow", "variables", "get", "capi_landing_root"], env=env, check=True, capture_output=True,
        text=True,
    ).stdout.strip().splitlines()[-1]
    assert landing == f"file://{home / 'landing'}"

    # The user edits a connection in the UI; the next start keeps the edit and only follows the
    # stand-in to its new port.
    subprocess.run(
        [local.BIN / "airflow", "connections", "delete", "liveramp_capi_default"], env=env, check=True,
        capture_output=True,
    )
    subprocess.run(
        [local.BIN / "airflow", "connections", "add", "liveramp_capi_default", "--conn-type", "liveramp_capi",
         "--conn-host", "http://127.0.0.1:40001", "--conn-password", "cfg-rotated", "--conn-extra",
         '{"concurrency": 7}'],
        env=env, check=True, capture_output=True,
    )
    local.seed_metadata(env, standin_port=40002)

    found = _connections(env)
    assert found["liveramp_capi_default"]["host"] == "http://127.0.0.1:40002"
    assert found["liveramp_capi_default"]["extra"] == {"concurrency": 7}
