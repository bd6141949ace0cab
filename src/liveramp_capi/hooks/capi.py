"""Airflow hook for LiveRamp's ATS Conversions API adapter (``send-events``).

The connection holds the base URL (host), the ATS configuration ID (password) and, in its extra
JSON, the sender's tuning keys (see :class:`~liveramp_capi.delivery.settings.CapiSettings`) plus
optional HTTP headers. The configuration ID lets anyone write events into the advertiser's
TikTok account, and it travels in the URL path: nothing in this module logs the URL or puts it
(or the ID) in an exception message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import quote

from liveramp_capi.delivery.sender import BatchSender, DeliveryOutcome, DeliveryStats, OutgoingBatch
from liveramp_capi.delivery.settings import CapiConfigError, CapiSettings
from liveramp_capi.hooks.liveramp_http import LiveRampHttpHook

__all__ = ["CapiConnectionConfig", "CapiRequestError", "LiveRampCapiHook"]

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


class LiveRampCapiHook(LiveRampHttpHook[CapiConnectionConfig]):
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
    request_error = CapiRequestError
    service = "Conversions API"
    # Whether the configuration ID is valid is not checked: how LiveRamp treats an empty batch
    # is undocumented, and a real batch would create events.
    configured_message = "ATS configuration ID is set (not validated)"

    def __init__(self, liveramp_capi_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(method="POST", http_conn_id=liveramp_capi_conn_id, **kwargs)

    def _read_config(self, connection: Any) -> CapiConnectionConfig:
        base_url = self._base_url_of(connection)
        config_id = (connection.password or "").strip()
        if not config_id:
            raise CapiConfigError(
                f"connection {self.http_conn_id} has no ATS configuration ID (password)"
            )
        settings, remaining = self._split_extra(connection, base_url)
        return CapiConnectionConfig(base_url, config_id, settings, self._headers_of(remaining))

    def get_delivery_config(self) -> CapiConnectionConfig:
        """
        Read the Airflow connection once and return what the sender needs.

        :raises CapiConfigError: when the configuration ID is missing or the extra is invalid;
            the message names the connection ID, never a secret.
        """
        return self.connection_config()

    def get_settings(self) -> CapiSettings:
        """Return the sender tuning of the connection (see :class:`CapiSettings`)."""
        return self.get_delivery_config().settings

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
        **progress: Any,
    ) -> DeliveryStats:
        """
        Deliver ``batches`` concurrently (blocking; runs its own event loop).

        :param batches: consumed lazily; see :meth:`BatchSender.deliver`.
        :param on_outcome: called once per batch on the event loop thread; keep it fast.
        :param progress: ``label`` and ``remaining`` of the progress lines, see
            :meth:`BatchSender.deliver`.
        :return: delivery counters.
        """
        return self.get_sender().deliver_sync(batches, on_outcome, **progress)

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
            data=body,  # type: ignore[arg-type]  # requests sends bytes as they are; HttpHook's hint is narrower
            headers={"Content-Type": "application/json"},
            extra_options={
                "check_response": False,
                "timeout": (config.settings.connect_timeout_seconds, config.settings.timeout_seconds),
            },
        )
        return int(response.status_code)
