"""The console's FastAPI app, mounted by the plugin in Airflow's api-server at :data:`URL_PREFIX`.

Airflow does not protect a plugin's app: every route here (pages, scripts, JSON) depends on
Airflow's own authentication (the UI's ``_token`` cookie or an ``Authorization: Bearer`` token)
and on read access to the DAG's runs, so an anonymous call gets 401 and a bad token 403.
Static files are served by a route (not a ``StaticFiles`` mount, which would skip the check).
"""

from __future__ import annotations

import time
from functools import lru_cache
from importlib import resources
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.engine import Engine

from liveramp_capi.console import reads, runs
from liveramp_capi.console.partitions import (
    daily_series,
    find_run,
    partition_detail,
    partition_rows,
    task_detail,
)
from liveramp_capi.console.plugin import URL_PREFIX
from liveramp_capi.console.summaries import OutputRoot
from liveramp_capi.domain.consent import DEFAULT_REFRESH_REMAINING_SHARE
from liveramp_capi.domain.partition import InvalidPartition, parse_partition
from liveramp_capi.pipeline.config import SETTINGS

STATE_CONN_ID = "capi_state_default"
_NO_RUN = f"no run of {' or '.join(runs.CONVERSIONS_DAG_IDS)} with this id"
_STATIC = {"console.js": "text/javascript", "console.css": "text/css", "icon.svg": "image/svg+xml"}

_read_runs = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=runs.CONVERSIONS_DAG_ID))
_read_refresh_runs = Depends(
    requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=runs.ENVELOPE_REFRESH_DAG_ID)
)


def readable_conversions_dags(user: GetUserDep) -> tuple[str, ...]:
    """The conversions DAGs (a day's, an hour's) whose runs this user may read.

    Every route already requires the daily DAG; the hourly DAG's runs (state, links, rerun) are
    shown only to users Airflow lets read them, as in Airflow's own views.
    """
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    manager = get_auth_manager()
    return tuple(
        dag_id
        for dag_id in runs.CONVERSIONS_DAG_IDS
        if manager.is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user)
    )


ReadableDags = Annotated[tuple[str, ...], Depends(readable_conversions_dags)]


def _variable(name: str) -> str:
    """The setting ``name`` of :data:`~liveramp_capi.pipeline.config.SETTINGS`, with the DAGs' default."""
    from airflow.sdk import Variable

    setting = SETTINGS[name]
    return str(Variable.get(str(setting.variable), default=setting.default))


def output_root() -> OutputRoot:
    """The output root the DAGs write to (Variable ``capi_output_root``, same default as the DAGs)."""
    return OutputRoot(_variable("output_root"))


def state_engine() -> Engine:
    """The state database (connection ``capi_state_default``); one engine per URL and process."""
    from liveramp_capi.hooks.state import CapiStateHook

    return _engine(CapiStateHook(capi_state_conn_id=STATE_CONN_ID).sqlalchemy_url())


#: How long the envelope health figures are reused: one grouped scan of the store (about a
#: second per million rows on SQLite, see `make bench`) for a picture that changes once a day.
HEALTH_TTL_SECONDS = 60.0
_health_cache: dict[tuple[str, float], tuple[float, dict[str, Any]]] = {}


def envelope_health(engine: Engine, remaining_share: float) -> dict[str, Any]:
    """:func:`reads.envelope_health`, reused for :data:`HEALTH_TTL_SECONDS` per database and refresh rule."""
    key = (str(engine.url), remaining_share)
    cached = _health_cache.get(key)
    if cached and time.monotonic() - cached[0] < HEALTH_TTL_SECONDS:
        return dict(cached[1])
    health = reads.envelope_health(engine, now=int(time.time()), remaining_share=remaining_share)
    _health_cache[key] = (time.monotonic(), health)
    return dict(health)


@lru_cache(maxsize=4)
def _engine(url: str) -> Engine:
    from liveramp_capi.state.database import make_engine

    return make_engine(url)


def _partition(value: str) -> str:
    try:
        return parse_partition(value)
    except InvalidPartition:
        raise HTTPException(status_code=404, detail="no such partition (expected YYYY-MM-DD or YYYY-MM-DDTHH)") from None


def _page(view: str) -> HTMLResponse:
    template = resources.files("liveramp_capi.console").joinpath("static/console.html").read_text()
    return HTMLResponse(template.replace("{{VIEW}}", view), headers={"Cache-Control": "no-store"})


def create_app() -> FastAPI:
    """Build the console app (every route requires read access to the conversions DAG's runs)."""
    app = FastAPI(
        title="Conversions delivery console",
        dependencies=[_read_runs],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse(f"{URL_PREFIX}/conversions")

    @app.get("/conversions", response_class=HTMLResponse)
    def conversions_page() -> HTMLResponse:
        return _page("conversions")

    @app.get("/run", response_class=HTMLResponse)
    def run_page() -> HTMLResponse:
        return _page("run")

    @app.get("/task", response_class=HTMLResponse)
    def task_page() -> HTMLResponse:
        return _page("task")

    @app.get("/envelopes", response_class=HTMLResponse, dependencies=[_read_refresh_runs])
    def envelopes_page() -> HTMLResponse:
        return _page("envelopes")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise HTTPException(status_code=404, detail="not found")
        body = resources.files("liveramp_capi.console").joinpath(f"static/{name}").read_bytes()
        return Response(body, media_type=_STATIC[name], headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/partitions")
    def partitions(
        session: SessionDep,
        dag_ids: ReadableDags,
        limit: Annotated[int, Query(ge=1, le=200)] = 25,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        return partition_rows(session, output_root(), state_engine(), limit=limit, offset=offset, dag_ids=dag_ids)

    @app.get("/api/partitions/{partition}")
    def partition(
        partition: str,
        session: SessionDep,
        dag_ids: ReadableDags,
        failed_limit: Annotated[int, Query(ge=1, le=500)] = 50,
        failed_offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        found = partition_detail(
            session, output_root(), state_engine(), _partition(partition),
            failed_limit=failed_limit, failed_offset=failed_offset, dag_ids=dag_ids,
        )
        if found is None:
            raise HTTPException(status_code=404, detail="no run, summary or ledger row for this partition")
        return found

    @app.get("/api/daily")
    def daily(session: SessionDep, days: Annotated[int, Query(ge=1, le=366)] = 30) -> dict[str, Any]:
        return daily_series(session, output_root(), days=days)

    @app.get("/api/runs/{run_id:path}")
    def run(run_id: str, session: SessionDep, dag_ids: ReadableDags, dag_id: str | None = None) -> dict[str, Any]:
        info = find_run(session, run_id, dag_id, dag_ids)
        if info is None:
            raise HTTPException(status_code=404, detail=_NO_RUN)
        detail = partition_detail(
            session, output_root(), state_engine(), info.partition, run_id=run_id, dag_id=info.dag_id, dag_ids=dag_ids
        )
        return detail or {"partition": info.partition}

    @app.get("/api/task")
    def task(
        session: SessionDep,
        dag_ids: ReadableDags,
        run_id: str,
        task_id: str,
        map_index: Annotated[int, Query(ge=-1)] = -1,
        dag_id: str | None = None,
    ) -> dict[str, Any]:
        found = task_detail(
            session, output_root(), state_engine(), run_id, task_id, map_index, dag_id=dag_id, dag_ids=dag_ids
        )
        if found is None:
            raise HTTPException(status_code=404, detail=_NO_RUN)
        return found

    @app.get("/api/envelopes", dependencies=[_read_refresh_runs])
    def envelopes(session: SessionDep) -> dict[str, Any]:
        try:
            share = float(_variable("remaining_share"))
        except ValueError:
            share = DEFAULT_REFRESH_REMAINING_SHARE  # the refresh DAG itself reports a malformed value
        health = envelope_health(state_engine(), share if 0 < share < 1 else DEFAULT_REFRESH_REMAINING_SHARE)
        health["last_refresh"] = output_root().latest_refresh_summary()
        health["last_refresh_run"] = runs.last_run(session, runs.ENVELOPE_REFRESH_DAG_ID)
        return health

    return app
