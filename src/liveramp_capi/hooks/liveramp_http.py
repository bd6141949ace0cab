"""Connection handling shared by the LiveRamp hooks (Conversions API, envelope refresh).

Both are ``HttpHook`` subclasses whose connection extra mixes three kinds of keys: tuning keys
of :class:`~liveramp_capi.delivery.settings.CapiSettings` (never sent as headers), keys of the
connection type itself (e.g. ``pid``), and further HTTP headers. Both carry secrets or
identifiers in their URLs, so no URL ever reaches a log line or an exception message.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

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
# requests' own default, for a session whose options set none.
_DEFAULT_MAX_REDIRECTS = 30


class ConnectionConfig(Protocol):
    """What every LiveRamp hook reads from its connection, besides its own keys."""

    @property
    def base_url(self) -> str: ...

    @property
    def settings(self) -> CapiSettings: ...


ConfigT = TypeVar("ConfigT", bound=ConnectionConfig)


class LiveRampHttpHook(HttpHook, Generic[ConfigT]):
    """Base of the LiveRamp hooks: base URL rules, extra splitting, URL-free errors.

    Only ``HttpHook``'s public surface is used (``get_connection``, ``get_conn``, ``run``,
    ``run_and_check``, ``url_from_endpoint``, ``test_connection``, ``base_url``, ``merged_extra``):
    the session is built here from the connection, so tuning keys never become headers and the
    base URL follows the same rules as the async clients. Subclasses set ``default_host``,
    :attr:`own_extra_keys`, :attr:`request_error`, :attr:`service`, :attr:`configured_message`
    and implement :meth:`_read_config`.
    """

    #: Extra keys of the connection type that are neither tuning keys nor headers.
    own_extra_keys: tuple[str, ...] = ()
    #: The exception raised for transport failures and (when checked) HTTP errors.
    request_error: type[Exception] = ConnectionError
    #: Names the service in messages: "request to the <service> failed", "<service> answered HTTP n".
    service = "service"
    #: What :meth:`test_connection` reports the connection to hold.
    configured_message = "connection is set"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The connection ID also under the subclass's own name (e.g. ``liveramp_capi_conn_id``).
        setattr(self, self.conn_name_attr, self.http_conn_id)
        self._config: ConfigT | None = None

    def _read_config(self, connection: Any) -> ConfigT:
        """Read what the client needs from the Airflow connection (once per hook)."""
        raise NotImplementedError

    def connection_config(self) -> ConfigT:
        """
        Read the Airflow connection once and return what the client needs.

        :raises CapiConfigError: when the connection lacks a required field or its extra is
            invalid; the message names the connection ID and the key, never a secret.
        """
        if self._config is None:
            self._config = self._read_config(self.get_connection(self.http_conn_id))
        return self._config

    def _base_url_of(self, connection: Any) -> str:
        host = (connection.host or "").strip() or self.default_host
        if "://" not in host:
            host = f"{connection.schema or 'https'}://{host}"
        if connection.port:
            host = f"{host.rstrip('/')}:{connection.port}"
        return str(host.rstrip("/"))

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

    def test_connection(self) -> tuple[bool, str]:
        """
        Check the connection's own fields, then that the base URL answers at all.

        Nothing is sent but ``HEAD <base URL>/``: any HTTP answer (even 404 or 405) proves
        reachability; whether LiveRamp accepts the credentials is not checked.
        """
        try:
            config = self.connection_config()
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
        return True, f"base URL reachable (HTTP {response.status_code}); {self.configured_message}"

    # -- HttpHook's public surface: the synchronous session of run() -------------------------

    def url_from_endpoint(self, endpoint: str | None) -> str:
        if not self.base_url:
            self.base_url = self._checked_base_url(self.get_connection(self.http_conn_id))
        return str(super().url_from_endpoint(endpoint))

    def _checked_base_url(self, connection: Any) -> str:
        # The same rules as the async clients (https by default, the LiveRamp host when empty); no SRV.
        base_url = self._base_url_of(connection)
        check_base_url(base_url)
        return base_url

    def get_conn(
        self, headers: dict[Any, Any] | None = None, extra_options: dict[str, Any] | None = None
    ) -> Session:
        """
        A ``requests`` session for :meth:`run`: the extra's headers (tuning and own keys left
        out), its HTTP options overridden by ``extra_options``, and ``verify_tls``.

        Also sets ``base_url`` and ``merged_extra``, which ``HttpHook.run`` reads.
        """
        connection = self.get_connection(self.http_conn_id)
        self.base_url = self._checked_base_url(connection)
        settings, remaining = self._split_extra(connection, self.base_url)
        options = {key: value for key, value in remaining.items() if key in HTTP_OPTION_KEYS}
        self.merged_extra = {**options, **(extra_options or {})}
        session = Session()
        if connection.login:
            session.auth = self.auth_type(connection.login, connection.password)
        session.proxies = self.merged_extra.get("proxies", self.merged_extra.get("proxy", {}))
        session.stream = self.merged_extra.get("stream", False)
        session.cert = self.merged_extra.get("cert")
        session.max_redirects = int(self.merged_extra.get("max_redirects", _DEFAULT_MAX_REDIRECTS))
        session.trust_env = self.merged_extra.get("trust_env", True)
        session.verify = settings.verify_tls
        adapter = self.adapter or self.keep_alive_adapter
        if adapter is not None:
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        session.headers.update(self.default_headers)
        session.headers.update(self._headers_of(remaining))
        session.headers.update(headers or {})
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
                    prepped_request.url or "",
                    proxies=session.proxies,
                    stream=session.stream,
                    verify=session.verify,
                    cert=session.cert,
                ),
            )
        except requests.RequestException as exc:
            raise self.request_error(f"request to the {self.service} failed ({type(exc).__name__})") from None
        if extra_options.get("check_response", True) and response.status_code >= 400:
            raise self.request_error(f"{self.service} answered HTTP {response.status_code}")
        return response
