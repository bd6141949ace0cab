"""Airflow hook for LiveRamp's ATS envelope refresh API.

The connection holds the base URL (host, default ``https://api.rlcdn.com``) and, in its extra
JSON, the placement id ``pid``, the ``origin`` sent as the ``Origin`` header (it must have passed
LiveRamp's privacy review), the refresher's tuning keys (those of
:class:`~liveramp_capi.delivery.settings.CapiSettings`; never sent as headers) and optional
further HTTP headers. Requests carry envelopes and consent strings in their query string:
nothing here logs a URL or puts one in an exception message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import requests
from airflow.providers.http.hooks.http import HttpHook
from requests import PreparedRequest, Session

from liveramp_capi.delivery.refresh import EnvelopeRefresher, RefreshOutcome, RefreshStats
from liveramp_capi.delivery.settings import CapiConfigError, CapiSettings, check_base_url
from liveramp_capi.domain.envelopes import StoredEnvelope
from liveramp_capi.hooks.capi import _HTTP_OPTION_KEYS, _REFUSED_KEYS, _ExtraView

__all__ = ["DEFAULT_REFRESH_RPS", "EnvelopeConnectionConfig", "EnvelopeRequestError", "LiveRampEnvelopeHook"]

#: Request-rate ceiling when the extra sets none: LiveRamp publishes no rate limit for the
#: envelope APIs, so the refresh stays polite by default (``max_requests_per_second: 0`` lifts it).
DEFAULT_REFRESH_RPS = 50.0

#: Extra keys of this connection type that are neither tuning keys nor headers.
_OWN_KEYS = ("pid", "origin")


class EnvelopeRequestError(ConnectionError):
    """A request to the envelope API failed; the message holds only the failure kind."""


class EnvelopeConnectionConfig(NamedTuple):
    """Everything the refresher needs, read once from the Airflow connection.

    :param base_url: e.g. ``https://api.rlcdn.com`` (no trailing slash).
    :param placement_id: the ATS placement id (``pid``).
    :param origin: the ``Origin`` header value, or None.
    :param settings: the refresher's tuning.
    :param headers: further HTTP headers from the extra (tuning and own keys removed).
    """

    base_url: str
    placement_id: str
    origin: str | None
    settings: CapiSettings
    headers: dict[str, str]


class LiveRampEnvelopeHook(HttpHook):
    """Refresh ATS identity envelopes through LiveRamp's envelope refresh API.

    Connection fields: *Base URL* (host; defaults to ``https://api.rlcdn.com``), *Extra*: ``pid``
    (required), ``origin`` (recommended), tuning keys of
    :class:`~liveramp_capi.delivery.settings.CapiSettings` (``max_requests_per_second``
    defaults to :data:`DEFAULT_REFRESH_RPS` here) and any further key as an HTTP header. Tuning
    keys, ``pid`` and ``origin`` are never sent as generic headers, by :meth:`refresh` nor by
    the inherited :meth:`get_conn` / :meth:`run`.

    :param liveramp_envelope_conn_id: the Airflow connection ID.
    :param kwargs: passed on to :class:`~airflow.providers.http.hooks.http.HttpHook`.
    """

    conn_name_attr = "liveramp_envelope_conn_id"
    default_conn_name = "liveramp_envelope_default"
    conn_type = "liveramp_envelope"
    hook_name = "LiveRamp ATS envelope refresh"
    default_host = "https://api.rlcdn.com"

    def __init__(self, liveramp_envelope_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(method="GET", http_conn_id=liveramp_envelope_conn_id, **kwargs)
        self.liveramp_envelope_conn_id = liveramp_envelope_conn_id
        self._config: EnvelopeConnectionConfig | None = None

    # -- connection handling -----------------------------------------------------------------

    def _base_url_of(self, connection: Any) -> str:
        host = (connection.host or "").strip() or self.default_host
        if "://" not in host:
            host = f"{connection.schema or 'https'}://{host}"
        if connection.port:
            host = f"{host.rstrip('/')}:{connection.port}"
        return host.rstrip("/")

    def _split_extra(self, connection: Any, base_url: str | None) -> tuple[CapiSettings, dict[str, Any]]:
        extra = dict(connection.extra_dejson or {})
        refused = sorted(_REFUSED_KEYS & extra.keys())
        if refused:
            raise CapiConfigError(
                f"connection {self.liveramp_envelope_conn_id}: extra key(s) {refused} are not supported; "
                "use verify_tls (allowed to be false only for a loopback base URL)"
            )
        rate_set = extra.get("max_requests_per_second") is not None
        try:
            settings, remaining = CapiSettings.from_extra(extra, base_url=base_url)
        except CapiConfigError as exc:
            raise CapiConfigError(f"connection {self.liveramp_envelope_conn_id}: {exc}") from None
        if not rate_set:
            settings = dataclasses.replace(settings, max_requests_per_second=DEFAULT_REFRESH_RPS)
        return settings, remaining

    def get_refresh_config(self) -> EnvelopeConnectionConfig:
        """Read the Airflow connection once and return what the refresher needs.

        :raises CapiConfigError: when ``pid`` is missing or the extra is invalid (the message
            names the connection ID and the key, never a value of the extra).
        """
        if self._config is not None:
            return self._config
        connection = self.get_connection(self.liveramp_envelope_conn_id)
        base_url = self._base_url_of(connection)
        settings, remaining = self._split_extra(connection, base_url)
        pid = remaining.pop("pid", None)
        origin = remaining.pop("origin", None)
        if pid is None or not str(pid).strip() or isinstance(pid, dict | list | bool):
            raise CapiConfigError(
                f"connection {self.liveramp_envelope_conn_id} has no placement id (extra key 'pid')"
            )
        if origin is not None and not isinstance(origin, str):
            raise CapiConfigError(f"connection {self.liveramp_envelope_conn_id}: extra key 'origin' must be a string")
        headers: dict[str, str] = {}
        for key, value in remaining.items():
            if key in _HTTP_OPTION_KEYS:
                continue
            if isinstance(value, dict | list) or value is None:
                raise CapiConfigError(
                    f"connection {self.liveramp_envelope_conn_id}: extra key {key!r} is neither a tuning key "
                    "nor a header with a scalar value"
                )
            headers[key] = str(value).lower() if isinstance(value, bool) else str(value)
        self._config = EnvelopeConnectionConfig(base_url, str(pid).strip(), origin or None, settings, headers)
        return self._config

    def _set_base_url(self, connection: Any) -> None:
        self.base_url = self._base_url_of(connection)
        check_base_url(self.base_url)
        self._srv_lookup_enabled = False
        self._base_url_initialized = True

    def _configure_session_from_extra(
        self, session: Session, connection: Any, extra_options: dict[str, Any]
    ) -> Session:
        settings, remaining = self._split_extra(connection, self.base_url or None)
        for key in _OWN_KEYS:
            remaining.pop(key, None)
        session = super()._configure_session_from_extra(session, _ExtraView(connection.host, remaining), extra_options)
        session.verify = settings.verify_tls
        return session

    def run_and_check(
        self, session: Session, prepped_request: PreparedRequest, extra_options: dict[Any, Any]
    ) -> Any:
        """Send the prepared request; failures are re-raised without the URL (it holds envelopes)."""
        try:
            response = session.send(
                prepped_request,
                timeout=extra_options.get("timeout"),
                allow_redirects=extra_options.get("allow_redirects", False),
                **session.merge_environment_settings(
                    prepped_request.url,
                    proxies=session.proxies,
                    stream=session.stream,
                    verify=session.verify,
                    cert=session.cert,
                ),
            )
        except requests.RequestException as exc:
            raise EnvelopeRequestError(f"request to the envelope API failed ({type(exc).__name__})") from None
        if extra_options.get("check_response", True) and response.status_code >= 400:
            raise EnvelopeRequestError(f"envelope API answered HTTP {response.status_code}")
        return response

    # -- refreshing ---------------------------------------------------------------------------

    def get_refresher(self, **kwargs: Any) -> EnvelopeRefresher:
        """Build an :class:`EnvelopeRefresher` from the connection.

        :param kwargs: passed to :class:`EnvelopeRefresher` (``rng``, ``sleep``).
        """
        config = self.get_refresh_config()
        return EnvelopeRefresher(
            config.base_url,
            config.placement_id,
            config.settings,
            origin=config.origin,
            extra_headers=config.headers,
            **kwargs,
        )

    def refresh(
        self, rows: Iterable[StoredEnvelope], on_outcome: Callable[[RefreshOutcome], None]
    ) -> RefreshStats:
        """Refresh ``rows`` concurrently (blocking; runs its own event loop).

        :param rows: consumed lazily.
        :param on_outcome: called once per row on the event loop thread; keep it fast.
        """
        return self.get_refresher().refresh_sync(rows, on_outcome)

    def test_connection(self) -> tuple[bool, str]:
        """Check that ``pid`` is set and that the base URL answers (no envelope is sent)."""
        try:
            config = self.get_refresh_config()
        except CapiConfigError as exc:
            return False, str(exc)
        session = self.get_conn()
        try:
            response = session.head(
                config.base_url + "/",
                timeout=(config.settings.connect_timeout_seconds, config.settings.timeout_seconds),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return False, f"base URL not reachable ({type(exc).__name__})"
        finally:
            session.close()
        return True, f"base URL reachable (HTTP {response.status_code}); placement id is set (not validated)"
