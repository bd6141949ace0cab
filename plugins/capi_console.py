"""Airflow plugin: the conversions delivery console (pages and API live in ``liveramp_capi.console``)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from liveramp_capi.console.plugin import external_views, fastapi_apps


class CapiConsolePlugin(AirflowPlugin):
    name = "capi_console"
    fastapi_apps = fastapi_apps()
    external_views = external_views()
