"""Helpers of the console tests."""

from __future__ import annotations


def token_for(role: str | None, username: str = "console-test") -> str:
    """A JWT Airflow itself signed, for a simple-auth-manager user with ``role`` (None: no rights)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role))


def sample_secrets() -> set[str]:
    """Every identifier, envelope, IP and consent string of the sample partition (and the refused event)."""
    import csv
    import json

    from capi_devtools.console_demo import REFUSED_EVENT_ID
    from capi_devtools.sample_partition import SAMPLE_DIR

    found: set[str] = {REFUSED_EVENT_ID}

    def add(value) -> None:
        if isinstance(value, str) and len(value) >= 4:
            found.add(value)

    for path in SAMPLE_DIR.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            add(record.get("event_id"))
            add(record.get("user_key"))
            add(record.get("client_ip"))
            for key in ("partner_id", "idfa", "idfv", "gaid"):
                add((record.get("user_data") or {}).get(key))
            consent = record.get("consent") or {}
            add(consent.get("cv"))
            add(consent.get("gpp"))
    for path in SAMPLE_DIR.glob("*.csv"):
        with path.open(newline="") as stream:
            for row in csv.DictReader(stream):
                for key in ("event_id", "partner_id", "user_key", "client_ip", "idfa", "idfv", "gaid", "cv", "gpp"):
                    add(row.get(key))
    return found
