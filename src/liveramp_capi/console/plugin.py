"""What the plugin registers: the console's FastAPI app and its places in the Airflow UI.

The views are external views (iframes of the console's own pages, served by its FastAPI app
from the same origin, so the UI's login cookie authenticates them): a **Conversions** page in
the navigation, **Envelope health** under it, and a **Conversions** tab on every DAG run page
and task instance page (for other DAGs it says so). ``{DAG_ID}``, ``{RUN_ID}``, ``{TASK_ID}``
and ``{MAP_INDEX}`` are filled in by the UI.
"""

from __future__ import annotations

from typing import Any

#: Where the api-server mounts the console (``liveramp_capi.console.app`` builds it).
URL_PREFIX = "/capi-console"


class LazyConsoleApp:
    """An ASGI app that builds the console on its first request.

    Airflow loads plugins in every component, task processes included; building the FastAPI
    app there would import the api-server's modules for nothing. Only the api-server calls it.
    """

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from liveramp_capi.console.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


def fastapi_apps() -> list[dict[str, Any]]:
    """The console app, mounted at :data:`URL_PREFIX`."""
    return [{"app": LazyConsoleApp(), "url_prefix": URL_PREFIX, "name": "Conversions delivery console"}]


def external_views() -> list[dict[str, Any]]:
    """The console's pages in the Airflow UI."""
    return [
        {
            "name": "Conversions",
            "href": f"{URL_PREFIX}/conversions",
            "url_route": "conversions",
            "destination": "nav",
            "nav_top_level": True,
            "icon": f"{URL_PREFIX}/static/icon.svg",
        },
        {
            "name": "Envelope health",
            "href": f"{URL_PREFIX}/envelopes",
            "url_route": "conversions-envelopes",
            "destination": "nav",
            "category": "browse",
        },
        {
            "name": "Conversions",
            "href": f"{URL_PREFIX}/run?dag_id={{DAG_ID}}&run_id={{RUN_ID}}",
            "url_route": "conversions-run",
            "destination": "dag_run",
        },
        {
            "name": "Conversions",
            "href": f"{URL_PREFIX}/task?dag_id={{DAG_ID}}&run_id={{RUN_ID}}&task_id={{TASK_ID}}&map_index={{MAP_INDEX}}",
            "url_route": "conversions-task",
            "destination": "task_instance",
        },
    ]
