"""Tuning knobs of the Conversions API sender, read from a connection's extra JSON.

The values here are not secret, so validation errors name both the key and the offending value.
The ATS configuration ID is never handled by this module.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from liveramp_capi.domain.batches import DEFAULT_MAX_BATCH_EVENTS, MAX_BATCH_EVENTS_LIMIT

__all__ = ["TUNING_KEYS", "CapiConfigError", "CapiSettings", "check_base_url", "is_loopback_host"]


class CapiConfigError(ValueError):
    """The CAPI connection or its tuning keys are invalid (the message never holds a secret)."""


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback_host(host: str | None) -> bool:
    """
    Tell whether ``host`` names the local machine (127.0.0.0/8, ::1 or ``localhost``).

    :param host: a host name or IP literal, as returned by ``urlsplit(url).hostname``.
    """
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str, *, verify_tls: bool = True) -> str:
    """
    Validate the base URL of the Conversions API and return it without trailing slashes.

    :param base_url: e.g. ``https://capi.analytics.rlcdn.com``; must be http or https with a host.
    :param verify_tls: whether TLS certificates are verified; ``False`` is only allowed for a
        loopback host (the local stand-in), never for a real endpoint.
    :raises CapiConfigError: on any violation. The base URL holds no secret (the configuration
        ID is appended later), but only its scheme/host are echoed anyway.
    """
    try:
        parts = urlsplit(base_url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise CapiConfigError("base URL is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise CapiConfigError(f"base URL must use http or https, not {parts.scheme or 'no scheme'!r}")
    if not host:
        raise CapiConfigError("base URL has no host")
    if parts.query or parts.fragment:
        raise CapiConfigError("base URL must not carry a query string or fragment")
    if not verify_tls and not is_loopback_host(host):
        raise CapiConfigError(
            f"verify_tls=false is only allowed for a loopback base URL (the local stand-in), not for host {host!r}"
        )
    return base_url.rstrip("/")


def _as_int(key: str, value: Any) -> int:
    # bool is an int subclass: reject it so {"concurrency": true} is not read as 1.
    if isinstance(value, bool):
        raise CapiConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise CapiConfigError(f"{key} must be an integer, got {value!r}")


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise CapiConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise CapiConfigError(f"{key} must be a number, got {value!r}") from None
    else:
        raise CapiConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(result):
        raise CapiConfigError(f"{key} must be a finite number, got {value!r}")
    return result


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise CapiConfigError(f"{key} must be true or false, got {value!r}")


@dataclass(frozen=True, slots=True)
class CapiSettings:
    """
    Tuning of the batch sender; every field can be set by the same key in the connection extra.

    :param concurrency: hard ceiling of requests in flight at once (1..1024); also the
        connection pool size. Below it the engine adapts the limit to the answers' latency.
    :param timeout_seconds: total time allowed for one request (connect + send + answer).
    :param connect_timeout_seconds: time allowed to obtain a connection.
    :param retry_budget_seconds: how long one item may keep retrying transient failures,
        counted from its first attempt; the next attempt is not made past it.
    :param max_attempts: optional cap on attempts per item, the first one included (0 = no cap:
        the time budget alone decides; 1 = no retry).
    :param backoff_base_seconds: first retry waits up to this long (full jitter, doubling).
    :param backoff_max_seconds: cap of the exponential backoff.
    :param retry_after_max_seconds: cap applied to a server's ``Retry-After``.
    :param max_requests_per_second: hard request-rate ceiling of this connection (0 = none);
        below it the rate adapts to 429 answers.
    :param adaptive: adapt the request rate to 429 answers and the in-flight limit to latency;
        ``False`` keeps both at their ceilings (the pre-adaptive behaviour, for diagnosis).
    :param progress_interval_seconds: how often a progress line is logged while sending.
    :param max_batch_events: events per request (1..1000; LiveRamp warns about large batches).
    :param verify_tls: verify TLS certificates; ``False`` only for the local stand-in on loopback.
    :param body_excerpt_bytes: how much of a rejected batch's response body is kept.
    """

    concurrency: int = 64
    timeout_seconds: float = 10.0
    connect_timeout_seconds: float = 5.0
    retry_budget_seconds: float = 600.0
    max_attempts: int = 0
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 2.0
    retry_after_max_seconds: float = 120.0
    max_requests_per_second: float = 0
    max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS
    verify_tls: bool = True
    body_excerpt_bytes: int = 2048
    adaptive: bool = True
    progress_interval_seconds: float = 15.0

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise CapiConfigError(f"{key} must be {rule}, got {getattr(self, key)!r}")

        check(1 <= self.concurrency <= 1024, "concurrency", "between 1 and 1024")
        check(0 < self.timeout_seconds <= 3600, "timeout_seconds", "> 0 and <= 3600")
        check(0 < self.connect_timeout_seconds <= 3600, "connect_timeout_seconds", "> 0 and <= 3600")
        check(0 < self.retry_budget_seconds <= 86_400, "retry_budget_seconds", "> 0 and <= 86400")
        check(0 <= self.max_attempts <= 1000, "max_attempts", "between 0 (no cap) and 1000")
        check(0 <= self.backoff_base_seconds <= 3600, "backoff_base_seconds", ">= 0 and <= 3600")
        check(
            self.backoff_base_seconds <= self.backoff_max_seconds <= 3600,
            "backoff_max_seconds",
            ">= backoff_base_seconds and <= 3600",
        )
        check(0 <= self.retry_after_max_seconds <= 3600, "retry_after_max_seconds", ">= 0 and <= 3600")
        check(self.max_requests_per_second >= 0, "max_requests_per_second", ">= 0 (0 = no ceiling)")
        check(
            1 <= self.max_batch_events <= MAX_BATCH_EVENTS_LIMIT,
            "max_batch_events",
            f"between 1 and {MAX_BATCH_EVENTS_LIMIT} (the Conversions API's most events per request)",
        )
        check(0 <= self.body_excerpt_bytes <= 1 << 20, "body_excerpt_bytes", "between 0 and 1048576")
        check(0 < self.progress_interval_seconds <= 86_400, "progress_interval_seconds", "> 0 and <= 86400")

    @classmethod
    def from_extra(
        cls, extra: dict[str, Any] | None, *, base_url: str | None = None
    ) -> tuple[CapiSettings, dict[str, Any]]:
        """
        Pop the tuning keys out of a connection extra and build the settings from them.

        :param extra: the connection's extra dict; it is not modified.
        :param base_url: when given, also checked with :func:`check_base_url` (scheme, and the
            loopback-only rule of ``verify_tls=false``).
        :return: ``(settings, remaining_extra)``; the remaining keys are the caller's business
            (HTTP headers, for the hook) and never contain a tuning key.
        :raises CapiConfigError: naming the key of any invalid value.
        """
        remaining = dict(extra or {})
        values: dict[str, Any] = {}
        for key, converter in _CONVERTERS.items():
            if key in remaining:
                raw = remaining.pop(key)
                if raw is not None:
                    values[key] = converter(key, raw)
        settings = cls(**values)
        if base_url is not None:
            check_base_url(base_url, verify_tls=settings.verify_tls)
        return settings, remaining


def _converter_for(type_name: str) -> Callable[[str, Any], Any]:
    converters: dict[str, Callable[[str, Any], Any]] = {"int": _as_int, "float": _as_float, "bool": _as_bool}
    return converters[type_name]


_CONVERTERS = {f.name: _converter_for(str(f.type)) for f in fields(CapiSettings)}

#: Keys of a connection extra that tune the sender and must never become HTTP headers.
TUNING_KEYS: frozenset[str] = frozenset(_CONVERTERS)
