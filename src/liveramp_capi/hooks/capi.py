"""Airflow hook for LiveRamp's ATS Conversions API adapter (``send-events``).

The connection holds the base URL (host), the ATS configuration ID (password) and, in its extra
JSON, the sender's tuning keys (see :class:`~liveramp_capi.delivery.settings.CapiSettings`) plus
optional HTTP headers. The configuration ID lets anyone write events into the advertiser's
TikTok account, and it travels in the URL path: nothing in this module logs the URL or puts it
(or the ID) in an exception message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import quote

import requests
from airflow.providers.http.hooks.http import HttpHook
from requests import PreparedRequest, Session

from liveramp_capi.delivery.sender import BatchSender, DeliveryOutcome, DeliveryStats, OutgoingBatch
from liveramp_capi.delivery.settings import CapiConfigError, CapiSettings, check_base_url

__all__ = ["CapiConnectionConfig", "CapiRequestError", "LiveRampCapiHook"]

# HttpHook options that must never reach the CAPI sender as headers either.
_HTTP_OPTION_KEYS = frozenset(
    {
        "stream",
        "cert",
        "proxy",
        "proxies",
        "timeout",
        "allow_redirects",
        "max_redirects",
        "trust_env",
        "check_response",
        "srv_lookup",
    }
)
# HttpHook's own TLS switches would bypass the loopback-only rule of ``verify_tls``.
_REFUSED_KEYS = frozenset({"verify", "verify_ssl"})


class CapiRequestError(ConnectionError):
    """A request to the Conversions API failed; the message holds only the failure kind."""


class CapiConnectionConfig(NamedTuple):
    """
    Everything the sender needs, read once from the Airflow connection.

    :param base_url: e.g. ``https://capi.analytics.rlcdn.com`` (no trailing slash).
    :param config_id: the ATS configuration ID (secret; hidden from ``repr``).
    :param settings: the sender's tuning.
    :param headers: extra HTTP headers from the connection extra (tuning keys removed).
    """

    base_url: str
    config_id: str
    settings: CapiSettings
    headers: dict[str, str]

    def __repr__(self) -> str:
        return (
            f"CapiConnectionConfig(base_url={self.base_url!r}, config_id='***', "
            f"settings={self.settings!r}, headers={sorted(self.headers)!r})"
        )


class _ExtraView:
    """A connection look-alike whose extra has the tuning keys removed, for HttpHook's helpers."""

    def __init__(self, host: str | None, extra: dict[str, Any]) -> None:
        self.host = host
        self.extra = json.dumps(extra) if extra else ""
        self.extra_dejson = extra


class LiveRampCapiHook(HttpHook):
    """
    Send conversion batches to LiveRamp's ATS Conversions API adapter.

    Connection fields: *Base URL* (host; defaults to ``https://capi.analytics.rlcdn.com``),
    *ATS configuration ID* (password, required), *Extra*: tuning keys of
    :class:`~liveramp_capi.delivery.settings.CapiSettings` and any further key as an HTTP header.
    Tuning keys are never sent as headers, by :meth:`send_batches` nor by the inherited
    :meth:`get_conn` / :meth:`run`.

    :param liveramp_capi_conn_id: the Airflow connection ID.
    :param kwargs: passed on to :class:`~airflow.providers.http.hooks.http.HttpHook`.
    """

    conn_name_attr = "liveramp_capi_conn_id"
    default_conn_name = "liveramp_capi_default"
    conn_type = "liveramp_capi"
    hook_name = "LiveRamp ATS Conversions API"
    default_host = "https://capi.analytics.rlcdn.com"

    def __init__(self, liveramp_capi_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(method="POST", http_conn_id=liveramp_capi_conn_id, **kwargs)
        self.liveramp_capi_conn_id = liveramp_capi_conn_id
        self._config: CapiConnectionConfig | None = None

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
                f"connection {self.liveramp_capi_conn_id}: extra key(s) {refused} are not supported; "
                "use verify_tls (allowed to be false only for a loopback base URL)"
            )
        try:
            return CapiSettings.from_extra(extra, base_url=base_url)
        except CapiConfigError as exc:
            raise CapiConfigError(f"connection {self.liveramp_capi_conn_id}: {exc}") from None

    def get_delivery_config(self) -> CapiConnectionConfig:
        """
        Read the Airflow connection once and return what the sender needs.

        :raises CapiConfigError: when the configuration ID is missing or the extra is invalid;
            the message names the connection ID, never a secret.
        """
        if self._config is not None:
            return self._config
        connection = self.get_connection(self.liveramp_capi_conn_id)
        base_url = self._base_url_of(connection)
        config_id = (connection.password or "").strip()
        if not config_id:
            raise CapiConfigError(
                f"connection {self.liveramp_capi_conn_id} has no ATS configuration ID (password)"
            )
        settings, remaining = self._split_extra(connection, base_url)
        headers: dict[str, str] = {}
        for key, value in remaining.items():
            if key in _HTTP_OPTION_KEYS:
                continue
            if isinstance(value, dict | list) or value is None:
                raise CapiConfigError(
                    f"connection {self.liveramp_capi_conn_id}: extra key {key!r} is neither a tuning key "
                    "nor a header with a scalar value"
                )
            headers[key] = str(value).lower() if isinstance(value, bool) else str(value)
        self._config = CapiConnectionConfig(base_url, config_id, settings, headers)
        return self._config

    def get_settings(self) -> CapiSettings:
        """Return the sender tuning of the connection (see :class:`CapiSettings`)."""
        return self.get_delivery_config().settings

    # -- HttpHook integration: keep tuning keys out of the requests session -------------------

    def _set_base_url(self, connection: Any) -> None:
        # Same rules as the sender (https by default, the LiveRamp host when empty); no SRV.
        self.base_url = self._base_url_of(connection)
        check_base_url(self.base_url)
        self._srv_lookup_enabled = False
        self._base_url_initialized = True

    def _configure_session_from_extra(
        self, session: Session, connection: Any, extra_options: dict[str, Any]
    ) -> Session:
        # get_conn() has just set self.base_url: check verify_tls=false against it here too.
        settings, remaining = self._split_extra(connection, self.base_url or None)
        view = _ExtraView(connection.host, remaining)
        session = super()._configure_session_from_extra(session, view, extra_options)
        session.verify = settings.verify_tls
        return session

    def run_and_check(
        self, session: Session, prepped_request: PreparedRequest, extra_options: dict[Any, Any]
    ) -> Any:
        """
        Send the prepared request; transport failures are re-raised without the URL.

        HttpHook logs and re-raises ``requests`` exceptions whose text contains the URL, hence
        the configuration ID; this override reports only the exception class.
        """
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
            raise CapiRequestError(f"request to the Conversions API failed ({type(exc).__name__})") from None
        if extra_options.get("check_response", True) and response.status_code >= 400:
            # HttpHook.check_response would log the body, which may echo event data.
            raise CapiRequestError(f"Conversions API answered HTTP {response.status_code}")
        return response

    # -- sending ------------------------------------------------------------------------------

    def get_sender(self, **kwargs: Any) -> BatchSender:
        """
        Build a :class:`BatchSender` from the connection.

        :param kwargs: passed to :class:`BatchSender` (``rng``, ``sleep``).
        """
        config = self.get_delivery_config()
        return BatchSender(
            config.base_url, config.config_id, config.settings, extra_headers=config.headers, **kwargs
        )

    def send_batches(
        self,
        batches: Iterable[OutgoingBatch],
        on_outcome: Callable[[OutgoingBatch, DeliveryOutcome], None],
    ) -> DeliveryStats:
        """
        Deliver ``batches`` concurrently (blocking; runs its own event loop).

        :param batches: consumed lazily; see :meth:`BatchSender.deliver`.
        :param on_outcome: called once per batch on the event loop thread; keep it fast.
        :return: delivery counters.
        """
        return self.get_sender().deliver_sync(batches, on_outcome)

    def send_batch_sequential(self, body: bytes) -> int:
        """
        POST one batch with the inherited synchronous :meth:`HttpHook.run`; no retry.

        The sequential baseline for benchmarks, not the production path.

        :param body: the serialized ``{"events": [...]}`` request body.
        :return: the HTTP status code.
        :raises CapiRequestError: on a transport failure (message without the URL).
        """
        config = self.get_delivery_config()
        response = self.run(
            endpoint=f"send-events/{quote(config.config_id, safe='')}",
            data=body,
            headers={"Content-Type": "application/json"},
            extra_options={
                "check_response": False,
                "timeout": (config.settings.connect_timeout_seconds, config.settings.timeout_seconds),
            },
        )
        return response.status_code

    def test_connection(self) -> tuple[bool, str]:
        """
        Check that a configuration ID is set and that the base URL answers at all.

        Nothing is posted: how LiveRamp treats an empty batch is undocumented, and a real
        batch would create events. Any HTTP answer to ``HEAD <base URL>`` (even 404 or 405)
        proves reachability; whether the configuration ID is valid is not checked.
        """
        try:
            config = self.get_delivery_config()
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
        return (
            True,
            f"base URL reachable (HTTP {response.status_code}); ATS configuration ID is set (not validated)",
        )
