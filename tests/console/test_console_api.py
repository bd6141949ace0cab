"""The console's endpoints inside Airflow's api-server app: authentication, numbers, paging."""

from __future__ import annotations

import pytest
from console_support import token_for

pytestmark = pytest.mark.airflow


def _get(client, path, role="viewer", **params):
    headers = {"Authorization": f"Bearer {token_for(role)}"} if role else {}
    return client.get(f"/capi-console/{path}", headers=headers, params=params)


def test_partition_rows_match_summaries(api_client, console_world):
    response = _get(api_client, "api/partitions")
    assert response.status_code == 200, response.text
    body = response.json()
    print(body)
