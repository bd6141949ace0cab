"""Hostile configuration and input: paths that try to leave the roots, non-HTTP base URLs, TLS
switched off for a real host, a stand-in asked to listen on every interface, unpinned dependencies."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from capi_devtools.standin_fixture import STANDIN_SCRIPT
from liveramp_capi.delivery.settings import CapiConfigError, CapiSettings, check_base_url
from liveramp_capi.domain.partition import InvalidPartition, InvalidRoot, check_root, parse_partition

REPO = Path(__file__).resolve().parents[2]
STANDIN = STANDIN_SCRIPT


@pytest.mark.parametrize(
    "value",
    [
        "../2026-01-01", "2026-01-01/..", "2026-01-01/../../etc", "..", "/etc/passwd", "/2026-01-01",
        "file:///etc", "s3://bucket/2026-01-01", "http://evil.example/2026-01-01", "2026-01-01\n../x",
        "2026-01-01%2F..", "2026-13-01", "2026-02-30", "", None, "2026-1-1", "２０２６-01-01", "2026-01-01 ",
        "2026-01-01T24", "2026-01-01T1", "2026-01-01T13/..", "2026-01-01T13:00", "2026-01-01t13", "2026-02-30T01",
        "2026-01-01T13/../../etc",
    ],
)
def test_partition_names_that_could_escape_the_roots_are_refused(value):
    if value == "2026-01-01 ":
        # Surrounding whitespace is trimmed; what remains is a plain date.
        assert parse_partition(value) == "2026-01-01"
        return
    with pytest.raises(InvalidPartition) as caught:
        parse_partition(value)
    # The refused value is not echoed back (it may be anything a user pasted).
    if value and len(value) > 10:
        assert value not in str(caught.value)


def test_the_dag_param_refuses_a_path_before_any_task_runs(airflow_db):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    bag = DagBag(dag_folder=str(REPO / "dags" / "tiktok_conversions.py"))
    param = bag.get_dag("tiktok_conversions").params.get_param("partition")
    assert param.resolve("2026-01-01") == "2026-01-01"
    # (A lone trailing newline passes the param's "^...$" pattern; parse_partition trims it to the date.)
    for value in ("../../etc", "/etc", "file:///etc", "2026-01-01/../x", "2026-01-01\n../x"):
        with pytest.raises(ParamValidationError):
            param.resolve(value)


@pytest.mark.parametrize(
    "url",
    [
        "relative/path", "/abs/path/without/scheme", "file://relative", "file:///data/../etc",
        "file:///data/./x", "http://example.com/landing", "https://example.com/x", "ftp://host/x",
        "file:///data?x=1", "file:///data#frag", "javascript:alert(1)", "",
    ],
)
def test_roots_must_be_absolute_storage_urls_without_dot_segments(url):
    with pytest.raises(InvalidRoot):
        check_root(url, name="capi_landing_root")


def test_input_file_names_cannot_leave_the_partition_folder(tmp_path):
    from liveramp_capi.storage import PartitionStorage

    storage = PartitionStorage(f"file://{tmp_path}/landing", f"file://{tmp_path}/out", "2026-01-01")
    for name in ("../secret.jsonl", "a/b.jsonl", "..", "", "."):
        with pytest.raises(ValueError):
            storage.open_input(name)


@pytest.mark.parametrize(
    "url",
    ["ftp://capi.analytics.rlcdn.com", "file:///etc/passwd", "javascript:alert(1)", "capi.analytics.rlcdn.com",
     "https://", "https://host/?q=1", "https://host/#f", "gopher://x", "ws://x"],
)
def test_base_urls_must_be_http_or_https_with_a_host(url):
    with pytest.raises(CapiConfigError):
        check_base_url(url)


def test_tls_verification_is_on_by_default_and_off_only_for_loopback():
    assert CapiSettings().verify_tls is True
    settings, _ = CapiSettings.from_extra({}, base_url="https://capi.analytics.rlcdn.com")
    assert settings.verify_tls is True
    for host in ("https://capi.analytics.rlcdn.com", "http://10.0.0.5:8099", "https://127.0.0.1.nip.io"):
        with pytest.raises(CapiConfigError, match="loopback"):
            CapiSettings.from_extra({"verify_tls": False}, base_url=host)
    for host in ("http://127.0.0.1:8099", "http://localhost:8099", "http://[::1]:8099"):
        settings, _ = CapiSettings.from_extra({"verify_tls": "false"}, base_url=host)
        assert settings.verify_tls is False


def test_the_hook_refuses_httphooks_own_tls_switches(monkeypatch):
    import json

    from liveramp_capi.hooks.capi import LiveRampCapiHook

    for key in ("verify", "verify_ssl"):
        monkeypatch.setenv(
            "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT",
            json.dumps({"conn_type": "liveramp_capi", "host": "https://capi.example", "password": "cfg-x",
                        "extra": {key: False}}),
        )
        with pytest.raises(CapiConfigError, match="not supported"):
            LiveRampCapiHook().get_delivery_config()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
def test_the_standin_refuses_to_bind_anything_but_loopback(host):
    result = subprocess.run(
        [sys.executable, str(STANDIN), "--host", host, "--port", "0"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "only loopback addresses are allowed" in result.stderr
    assert "listening" not in result.stdout


def test_the_standin_fixture_listens_on_loopback_only(standin):
    assert standin.url.startswith("http://127.0.0.1:")


# -- pins ------------------------------------------------------------------------------------

_REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([A-Za-z0-9.+!_-]+)\s*(;.*)?$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _REQ.match(line)
        assert match, f"{path.name}:{number}: {raw!r} is not pinned with == (name==version)"
        pins[_normalise(match.group(1))] = match.group(3)
    return pins


def test_every_dependency_is_pinned_and_matches_the_constraints():
    constraints = _pins(REPO / "constraints.txt")
    assert len(constraints) > 50, "constraints.txt should pin every installed package"
    requirement_files = sorted(REPO.glob("requirements*.txt"))
    assert requirement_files
    for path in requirement_files:
        for name, version in _pins(path).items():
            assert name in constraints, f"{path.name}: {name} is missing from constraints.txt"
            assert constraints[name] == version, f"{path.name}: {name}=={version} but constraints.txt has {constraints[name]}"
