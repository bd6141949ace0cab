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

from liveramp_capi.delivery.refresh import EnvelopeRefresher, RefreshOutcome, RefreshStats
from liveramp_capi.delivery.settings import CapiConfigError, CapiSettings
from liveramp_capi.domain.envelopes import StoredEnvelope
from liveramp_capi.hooks.liveramp_http import LiveRampHttpHook

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


class LiveRampEnvelopeHook(LiveRampHttpHook[EnvelopeConnectionConfig]):
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
    own_extra_keys = _OWN_KEYS
    request_error = EnvelopeRequestError
    service = "envelope API"
    configured_message = "placement id is set (not validated)"

    def __init__(self, liveramp_envelope_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(method="GET", http_conn_id=liveramp_envelope_conn_id, **kwargs)

    # -- connection handling -----------------------------------------------------------------

    def _tuning_defaults(self, settings: CapiSettings, extra: dict[str, Any]) -> CapiSettings:
        # LiveRamp publishes no rate limit for the envelope APIs: stay polite unless told.
        if extra.get("max_requests_per_second") is None:
            return dataclasses.replace(settings, max_requests_per_second=DEFAULT_REFRESH_RPS)
        return settings

    def _read_config(self, connection: Any) -> EnvelopeConnectionConfig:
        base_url = self._base_url_of(connection)
        settings, remaining = self._split_extra(connection, base_url)
        pid = remaining.pop("pid", None)
        origin = remaining.pop("origin", None)
        if pid is None or not str(pid).strip() or isinstance(pid, dict | list | bool):
            raise CapiConfigError(
                f"connection {self.http_conn_id} has no placement id (extra key 'pid')"
            )
        if origin is not None and not isinstance(origin, str):
            raise CapiConfigError(f"connection {self.http_conn_id}: extra key 'origin' must be a string")
        headers = self._headers_of(remaining)
        return EnvelopeConnectionConfig(base_url, str(pid).strip(), origin or None, settings, headers)

    def get_refresh_config(self) -> EnvelopeConnectionConfig:
        """Read the Airflow connection once and return what the refresher needs.

        :raises CapiConfigError: when ``pid`` is missing or the extra is invalid (the message
            names the connection ID and the key, never a value of the extra).
        """
        return self.connection_config()

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
