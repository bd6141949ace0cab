"""docker-compose.yaml and the Dockerfile promise what the README says (no Docker engine here to run them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-worker": "celery worker",
    "airflow-triggerer": "triggerer",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def _interpolate_defaults(value: str) -> str:
    """What compose makes of ``${NAME:-default}`` with no .env: the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_services_are_those_of_the_official_airflow_3_compose(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "airflow-init", *AIRFLOW_SERVICES} <= set(services)
    for name, command in AIRFLOW_SERVICES.items():
        assert services[name]["command"] == command, name
        assert "healthcheck" in services[name], f"{name} needs a healthcheck"
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "redis"):
        assert "healthcheck" in services[name]
    assert services["postgres"]["image"].startswith("postgres:")
    # The worker is scalable: no container_name, no host port.
    assert "container_name" not in services["airflow-worker"] and "ports" not in services["airflow-worker"]
    assert services["airflow-apiserver"]["ports"] == ["8080:8080"]


def test_every_airflow_service_uses_the_project_image_and_shared_config(compose: dict) -> None:
    common = compose["x-airflow-common"]
    assert common["build"]["context"] == "." and common["build"]["dockerfile"] == "Dockerfile"
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in json.dumps(compose)
    for name in ("airflow-init", *AIRFLOW_SERVICES):
        service = compose["services"][name]
        assert service["image"] == common["image"], name  # merged from the x-airflow-common anchor
        assert service["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert "capi-data:/opt/airflow/capi" in service["volumes"], name
    env = common["environment"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == "liveramp_capi.deployment.hostname"
    # The state DB is PostgreSQL too, on the same server, in its own database.
    state = json.loads(_interpolate_defaults(env["AIRFLOW_CONN_CAPI_STATE_DEFAULT"]))
    assert state["conn_type"] == "postgres" and state["host"] == "postgres" and state["schema"] == "capi_state"
    assert _interpolate_defaults(env["AIRFLOW_VAR_CAPI_LANDING_ROOT"]) == "file:///opt/airflow/capi/landing"
    assert _interpolate_defaults(env["AIRFLOW_VAR_CAPI_OUTPUT_ROOT"]) == "file:///opt/airflow/capi/output"
    assert common["env_file"] == [{"path": ".env", "required": False}]
    assert set(compose["volumes"]) == {"postgres-db-volume", "capi-data"}
    assert "CREATE DATABASE" in " ".join(compose["services"]["airflow-init"]["command"])


def test_secrets_come_from_env_not_from_the_compose_file(compose: dict) -> None:
    env = compose["x-airflow-common"]["environment"]
    assert ":?" in env["AIRFLOW__API_AUTH__JWT_SECRET"], "the JWT secret must be required from .env"
    assert "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT" not in env, "the ATS configuration ID comes from .env only"
    gitignore = (REPO / ".gitignore").read_text().split()
    assert ".env" in gitignore
    assert ".env" in (REPO / ".dockerignore").read_text().split()
    example = (REPO / ".env.example").read_text()
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT", "POSTGRES_PASSWORD",
                "AIRFLOW__CORE__FERNET_KEY", "CAPI_PARTITION_DEADLINE_MINUTES"):
        assert re.search(rf"^{key}=", example, re.M), key


def test_standin_is_an_opt_in_profile_unreachable_from_the_host(compose: dict) -> None:
    standin = compose["services"]["liveramp-standin"]
    assert standin["profiles"] == ["standin"]
    assert "ports" not in standin  # reachable from the compose network only
    command = " ".join(standin["command"])
    # The image ships no development tool: the stand-in's scripts come from a read-only mount.
    assert "./devtools/capi_devtools:/opt/capi-devtools:ro" in standin["volumes"]
    assert "/opt/capi-devtools/liveramp_standin.py --host 127.0.0.1" in command
    assert "/opt/capi-devtools/standin_gateway.py" in command


def test_image_ships_no_development_tool() -> None:
    """Only the package, the DAGs and the plugin enter the image; devtools/ never does."""
    text = (REPO / "Dockerfile").read_text()
    copied = {source for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M) for source in line.split()[:-1]}
    assert copied == {"requirements.txt", "constraints.txt", "pyproject.toml", "README.md", "src", "dags", "plugins"}
    assert "PYTHONPATH" not in text
    assert "devtools" in (REPO / ".dockerignore").read_text().split()
    # Nothing the image does carry names a development tool: no module, no import.
    devtools = {path.stem for path in (REPO / "devtools" / "capi_devtools").glob("*.py")} - {"__init__"}
    shipped = [path for folder in ("src", "dags", "plugins") for path in (REPO / folder).rglob("*.py")]
    assert shipped and not {path.stem for path in shipped} & devtools
    for path in shipped:
        assert not re.search(r"^\s*(from|import) capi_devtools", path.read_text(), re.M), path


def test_dockerfile_bakes_pinned_requirements_and_the_package_into_airflow_3_3_2() -> None:
    text = (REPO / "Dockerfile").read_text()
    image = re.search(r"^ARG AIRFLOW_IMAGE=(\S+)$", text, re.M).group(1)
    assert image.startswith("apache/airflow:3.3.2")
    assert re.search(r"^FROM \$\{AIRFLOW_IMAGE\}$", text, re.M)
    # Same Python as the pins (constraints.txt was resolved on 3.11; pyproject requires <3.12).
    assert image.endswith("-python3.11")
    assert "pip install --no-cache-dir -r /opt/capi/requirements.txt -c /opt/capi/constraints.txt" in text
    assert "pip install --no-cache-dir --no-deps /opt/capi" in text
    assert "COPY --chown=airflow:0 dags /opt/airflow/dags" in text
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in text.replace("(no _PIP_ADDITIONAL_REQUIREMENTS)", "")
    requirements = (REPO / "requirements.txt").read_text()
    assert "apache-airflow==3.3.2" in requirements
    assert "apache-airflow-providers-celery[redis]==" in requirements
    assert "apache-airflow-providers-postgres==" in requirements
