"""Connection handling shared by the LiveRamp hooks (Conversions API, envelope refresh).

Both are ``HttpHook`` subclasses whose connection extra mixes three kinds of keys: tuning keys
of :class:`~liveramp_capi.delivery.settings.CapiSettings` (never sent as headers), keys of the
connection type itself (e.g. ``pid``), and further HTTP headers. Both carry secrets or
identifiers in their URLs, so no URL ever reaches a log line or an exception message.
"""

from __future__ import annotations

import json
from typing import Any

import requests
from airflow.providers.http.hooks.http import HttpHook
from requests import PreparedRequest, Session

from liveramp_capi.delivery.settings import CapiConfigError, CapiSettings, check_base_url

# HttpHook options that must never reach the async clients as headers either.
HTTP_OPTION_KEYS = frozenset(
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
REFUSED_KEYS = frozenset({"verify", "verify_ssl"})


class _ExtraView:
    """A connection look-alike whose extra has the tuning keys removed, for HttpHook's helpers."""

    def __init__(self, host: str | None, extra: dict[str, Any]) -> None:
        self.host = host
        self.extra = json.dumps(extra) if extra else ""
        self.extra_dejson = extra


class LiveRampHttpHook(HttpHook):
    """Base of the LiveRamp hooks: base URL rules, extra splitting, URL-free errors.

    Subclasses set ``default_host``, :attr:`own_extra_keys`, :attr:`request_error` and the two
    message prefixes.
    """

    #: Extra keys of the connection type that are neither tuning keys nor headers.
    own_extra_keys: tuple[str, ...] = ()
    #: The exception raised for transport failures and (when checked) HTTP errors.
    request_error: type[Exception] = ConnectionError
    #: "request to <service> failed" / "<service> answered HTTP n".
    request_failed_message = "request failed"
    answered_message = "service answered"

    def _base_url_of(self, connection: Any) -> str:
        host = (connection.host or "").strip() or self.default_host
        if "://" not in host:
            host = f"{connection.schema or 'https'}://{host}"
        if connection.port:
            host = f"{host.rstrip('/')}:{connection.port}"
        return host.rstrip("/")

    def _tuning_defaults(self, settings: CapiSettings, extra: dict[str, Any]) -> CapiSettings:
        """Adjust the settings for keys the extra left unset (nothing by default)."""
        return settings

    def _split_extra(self, connection: Any, base_url: str | None) -> tuple[CapiSettings, dict[str, Any]]:
        """Return the tuning settings and the rest of the extra (own keys and headers)."""
        extra = dict(connection.extra_dejson or {})
        refused = sorted(REFUSED_KEYS & extra.keys())
        if refused:
            raise CapiConfigError(
                f"connection {self.http_conn_id}: extra key(s) {refused} are not supported; "
                "use verify_tls (allowed to be false only for a loopback base URL)"
            )
        try:
            settings, remaining = CapiSettings.from_extra(extra, base_url=base_url)
        except CapiConfigError as exc:
            raise CapiConfigError(f"connection {self.http_conn_id}: {exc}") from None
        return self._tuning_defaults(settings, extra), remaining

    def _headers_of(self, remaining: dict[str, Any]) -> dict[str, str]:
        """The extra keys that are HTTP headers: scalars only, HttpHook options left out."""
        headers: dict[str, str] = {}
        for key, value in remaining.items():
            if key in HTTP_OPTION_KEYS or key in self.own_extra_keys:
                continue
            if isinstance(value, dict | list) or value is None:
                raise CapiConfigError(
                    f"connection {self.http_conn_id}: extra key {key!r} is neither a tuning key "
                    "nor a header with a scalar value"
                )
            headers[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return headers

    def _probe(self, base_url: str, settings: CapiSettings, configured: str) -> tuple[bool, str]:
        """``test_connection`` body: any HTTP answer to ``HEAD <base URL>/`` proves reachability.

        :param base_url: the connection's base URL.
        :param settings: for the timeouts.
        :param configured: what the connection was checked to hold, for the message.
        """
        session = self.get_conn()
        try:
            response = session.head(
                base_url + "/",
                timeout=(settings.connect_timeout_seconds, settings.timeout_seconds),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return False, f"base URL not reachable ({type(exc).__name__})"
        finally:
            session.close()
        return True, f"base URL reachable (HTTP {response.status_code}); {configured}"

    # -- HttpHook integration: keep tuning keys out of the requests session -------------------

    def _set_base_url(self, connection: Any) -> None:
        # The same rules as the async clients (https by default, the LiveRamp host when empty); no SRV.
        self.base_url = self._base_url_of(connection)
        check_base_url(self.base_url)
        self._srv_lookup_enabled = False
        self._base_url_initialized = True

    def _configure_session_from_extra(
        self, session: Session, connection: Any, extra_options: dict[str, Any]
    ) -> Session:
        # get_conn() has just set self.base_url: check verify_tls=false against it here too.
        settings, remaining = self._split_extra(connection, self.base_url or None)
        for key in self.own_extra_keys:
            remaining.pop(key, None)
        session = super()._configure_session_from_extra(session, _ExtraView(connection.host, remaining), extra_options)
        session.verify = settings.verify_tls
        return session

    def run_and_check(
        self, session: Session, prepped_request: PreparedRequest, extra_options: dict[Any, Any]
    ) -> Any:
        """
        Send the prepared request; transport failures are re-raised without the URL.

        HttpHook logs and re-raises ``requests`` exceptions whose text contains the URL (which
        holds the configuration ID, or envelopes); this override reports only the exception
        class, and never logs the response body (it may echo event data).
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
            raise self.request_error(f"{self.request_failed_message} ({type(exc).__name__})") from None
        if extra_options.get("check_response", True) and response.status_code >= 400:
            raise self.request_error(f"{self.answered_message} HTTP {response.status_code}")
        return response
