"""Pytest plugin (loaded with ``-p capi_devtools.airflow_env``): an isolated Airflow home for the test session.

Airflow reads its configuration when it is first imported, so this runs before any conftest or
test module imports it: every test process gets its own ``AIRFLOW_HOME`` with a SQLite metadata
DB, this repository's ``dags/`` folder and no example DAGs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from capi_devtools import REPO

if "CAPI_TEST_AIRFLOW_HOME" not in os.environ:
    os.environ["CAPI_TEST_AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="capi-airflow-")
_HOME = Path(os.environ["CAPI_TEST_AIRFLOW_HOME"])
os.environ.update(
    {
        "AIRFLOW_HOME": str(_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(_HOME / "logs"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # dag.test() in Airflow 3.3.2 crashes on a successful run of a DAG with a deadline alert.
        "CAPI_PARTITION_DEADLINE_MINUTES": "0",
    }
)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB (SQLite) for real DAG runs; migrated once per session."""
    marker = _HOME / ".migrated"
    if not marker.exists():
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            check=True,
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        marker.touch()
    return _HOME
