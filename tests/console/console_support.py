"""Helpers of the console tests."""

from __future__ import annotations


def token_for(role: str | None, username: str = "console-test") -> str:
    """A JWT Airflow itself signed, for a simple-auth-manager user with ``role`` (None: no rights)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role))
