#!/usr/bin/env python
"""A local STAND-IN for LiveRamp's endpoints, for demos and tests. It is NOT LiveRamp.

It imitates, on a loopback address only:

* ``POST /send-events/{config_id}`` - the ATS Conversions API adapter. LiveRamp documents no
  status codes, error bodies or rate limits for it, so the answers here are this stand-in's own
  choices: 200 ``{"status":"ok","events_received":N}``, 404 for an unknown configuration ID,
  400 for a malformed batch.
* ``GET /api/identity/v2/envelope/refresh`` - the ATS envelope refresh API, answering with the
  documented body shape and a deterministic "refreshed" envelope (``"R1." + sha256(iv)``).

Faults (latency, 5xx, 429 + Retry-After, dropped connections, stalls before/after accepting,
a request-rate limit, a token bucket, rejected event ids, per-envelope refresh failures) are set
with command line flags and changed at run time with ``POST /_standin/config``.

Throttle mode (``--rate R --burst B``, config keys ``rate`` and ``burst``): a token bucket
refilled at R tokens/s holding at most B (default R/10); each request on either LiveRamp endpoint
takes a token, and finds 429 + ``Retry-After`` (``retry_after_seconds``) when the bucket is empty,
before any latency. It is how an API gateway usually throttles, and what LiveRamp may do: it
publishes no limit. Control endpoints under
``/_standin/`` expose what was received and counters.

Run: ``python -m capi_devtools.liveramp_standin --port 8099 [--host 127.0.0.1] [--config-id cfg-1]
[--latency-ms 50] [--record-file path]``; ``--port 0`` picks a free port. When ready it prints
``liveramp-standin listening on http://HOST:PORT``. Only stdlib, aiohttp and orjson are used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import ipaddress
import random
import signal
import socket
import sys
import time
from typing import Any

import orjson
from aiohttp import web

DEFAULT_CONFIG: dict[str, Any] = {
    "config_ids": ["cfg-1"],
    "latency_ms": 0.0,
    "error_rate": 0.0,
    "throttle_rate": 0.0,
    "retry_after_seconds": 1,
    "drop_rate": 0.0,
    "stall_rate": 0.0,
    "stall_seconds": 30.0,
    "accept_then_stall_rate": 0.0,
    "rate_limit_rps": 0.0,
    "rate": 0.0,
    "burst": 0.0,
    "reject_event_ids": [],
    "seed": None,
    "refresh_err_ivs": [],
    "refresh_status_by_iv": {},
    "keep_in_memory": True,
    "max_events_per_batch": 1000,
}

_RATES = ("error_rate", "throttle_rate", "drop_rate", "stall_rate", "accept_then_stall_rate")


def _validate_config(update: dict[str, Any]) -> dict[str, Any]:
    """Check a (partial) config and return it normalised; raise ValueError on a bad key/value."""
    out: dict[str, Any] = {}
    for key, value in update.items():
        if key not in DEFAULT_CONFIG:
            raise ValueError(f"unknown config key {key!r}")
        if key in _RATES:
            value = float(value)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be between 0 and 1")
        elif key in ("latency_ms", "stall_seconds", "rate_limit_rps", "retry_after_seconds", "rate", "burst"):
            value = float(value)
            if value < 0:
                raise ValueError(f"{key} must be >= 0")
            if key == "retry_after_seconds" and value.is_integer():
                value = int(value)
        elif key in ("config_ids", "reject_event_ids", "refresh_err_ivs"):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key} must be a list of strings")
        elif key == "refresh_status_by_iv":
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be an object {{iv: status}}")
            value = {str(k): int(v) for k, v in value.items()}
        elif key == "seed":
            value = None if value is None else int(value)
        elif key == "keep_in_memory":
            value = bool(value)
        elif key == "max_events_per_batch":
            value = int(value)
        out[key] = value
    return out


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _refreshed_envelope(iv: str) -> str:
    digest = hashlib.sha256(iv.encode()).digest()
    return "R1." + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _pair_id(iv: str) -> str:
    digest = hashlib.sha256(b"pair:" + iv.encode()).digest()
    return base64.b64encode(digest).decode()


def _project(event: Any, paths: list[list[str]]) -> dict[str, Any]:
    """Keep only the dotted ``paths`` of an event (for ``?fields=``)."""
    result: dict[str, Any] = {}
    for path in paths:
        node: Any = event
        for part in path:
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is None:
            continue
        target = result
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = node
    return result


class StandIn:
    """State and handlers of the stand-in server."""

    def __init__(self, config: dict[str, Any], record_file: str | None) -> None:
        self.config = dict(DEFAULT_CONFIG)
        self.config.update(_validate_config(config))
        self.rng = random.Random(self.config["seed"])
        self.record_path = record_file
        # Buffered, flushed when the stand-in stops (SIGTERM closes it): a flush per batch is a
        # write call per request, CPU the end-to-end bench's client shares on the same cores.
        self.record_fh = open(record_file, "ab", buffering=1 << 20) if record_file else None
        self._reset_records()

    def _reset_records(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.refresh_calls: list[dict[str, str]] = []
        self.by_status: collections.Counter[int] = collections.Counter()
        self.requests = 0
        self.batch_count = 0
        self.event_count = 0
        self.dropped = 0
        self.stalled = 0
        self.throttled = 0
        self.rate_limited = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._arrivals: collections.deque[float] = collections.deque()
        self.max_rps = 0
        self._admitted: collections.deque[float] = collections.deque()
        self.started = time.monotonic()
        self._tokens: float | None = None  # a full bucket on the first request
        self._refilled_at = self.started

    # -- faults -----------------------------------------------------------------------------

    def _note_arrival(self, now: float) -> None:
        arrivals = self._arrivals
        arrivals.append(now)
        while now - arrivals[0] >= 1.0:
            arrivals.popleft()
        if len(arrivals) > self.max_rps:
            self.max_rps = len(arrivals)

    def _over_rate_limit(self, now: float) -> bool:
        limit = self.config["rate_limit_rps"]
        if not limit:
            return False
        admitted = self._admitted
        while admitted and now - admitted[0] >= 1.0:
            admitted.popleft()
        if len(admitted) >= limit:
            return True
        admitted.append(now)
        return False

    def _bucket_empty(self, now: float) -> bool:
        """Take a token from the throttle-mode bucket; True when there was none."""
        rate = self.config["rate"]
        if not rate:
            return False
        burst = self.config["burst"] or max(1.0, rate / 10)
        tokens = burst if self._tokens is None else min(burst, self._tokens + (now - self._refilled_at) * rate)
        self._refilled_at = now
        if tokens < 1.0:
            self._tokens = tokens
            return True
        self._tokens = tokens - 1.0
        return False

    def _roll(self, key: str) -> bool:
        rate = self.config[key]
        return rate > 0 and self.rng.random() < rate

    async def _drop(self, request: web.Request, partial: bool) -> web.StreamResponse:
        """Close the connection without a (complete) answer."""
        self.dropped += 1
        if partial:
            # Promise a body, send part of it, then hang up: the client sees a payload error.
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.content_length = 64
            await response.prepare(request)
            await response.write(b'{"status":"o')
        transport = request.transport
        if transport is not None:
            transport.close()  # close() still flushes the partial body, abort() would not
        raise asyncio.CancelledError  # aiohttp then drops the request without writing anything

    async def _common_faults(self, request: web.Request) -> web.StreamResponse | None:
        """Faults shared by both LiveRamp endpoints; returns a response when one fires."""
        now = time.monotonic()
        if self._over_rate_limit(now):
            self.rate_limited += 1
            return _json({"error": "rate limit exceeded"}, 429, {"Retry-After": "1"})
        if self._bucket_empty(now):
            self.rate_limited += 1
            return _json(
                {"error": "rate limit exceeded"}, 429, {"Retry-After": str(self.config["retry_after_seconds"])}
            )
        latency = self.config["latency_ms"]
        if latency:
            await asyncio.sleep(latency / 1000.0)
        if self._roll("stall_rate"):
            self.stalled += 1
            await asyncio.sleep(self.config["stall_seconds"])
            return _json({"error": "stalled"}, 503)
        if self._roll("drop_rate"):
            await self._drop(request, partial=self.rng.random() < 0.5)
        if self._roll("throttle_rate"):
            self.throttled += 1
            return _json(
                {"error": "too many requests"}, 429, {"Retry-After": str(self.config["retry_after_seconds"])}
            )
        if self._roll("error_rate"):
            status = self.rng.choice((500, 502, 503))
            return _json({"error": "injected server error"}, status)
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_standin/"):
            if not _is_loopback(request.remote):
                return _json({"error": "control endpoints are loopback-only"}, 403)
            return await handler(request)
        now = time.monotonic()
        self.requests += 1
        self._note_arrival(now)
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self.by_status[exc.status] += 1
            raise
        finally:
            self.in_flight -= 1
        self.by_status[response.status] += 1
        return response

    # -- LiveRamp endpoints -------------------------------------------------------------------

    async def send_events(self, request: web.Request) -> web.StreamResponse:
        fault = await self._common_faults(request)
        if fault is not None:
            return fault
        config_id = request.match_info["config_id"]
        if config_id not in self.config["config_ids"]:
            return _json({"error": "unknown configuration id"}, 404)
        raw = await request.read()
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _json({"error": "body is not valid JSON"}, 400)
        events = payload.get("events") if isinstance(payload, dict) else None
        if not isinstance(events, list):
            return _json({"error": "body must be an object with an events array"}, 400)
        if not 1 <= len(events) <= self.config["max_events_per_batch"]:
            return _json(
                {"error": f"a batch must hold 1 to {self.config['max_events_per_batch']} events"}, 400
            )
        reject = self.config["reject_event_ids"]
        for index, event in enumerate(events):
            if not isinstance(event, dict) or not isinstance(event.get("event_id"), str | int):
                return _json({"error": "every event needs an event_id", "index": index}, 400)
            if reject and str(event["event_id"]) in reject:
                return _json({"error": "invalid event", "event_id": event["event_id"]}, 400)
        self._record(config_id, events)
        if self._roll("accept_then_stall_rate"):
            self.stalled += 1
            await asyncio.sleep(self.config["stall_seconds"])
        return _json({"status": "ok", "events_received": len(events)})

    def _record(self, config_id: str, events: list[Any]) -> None:
        record = {"config_id": config_id, "events": events, "received_at": time.time()}
        self.batch_count += 1
        self.event_count += len(events)
        if self.config["keep_in_memory"]:
            self.batches.append(record)
        if self.record_fh is not None:
            self.record_fh.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))

    async def refresh(self, request: web.Request) -> web.StreamResponse:
        query = {key: request.query[key] for key in request.query}
        self.refresh_calls.append(query)
        fault = await self._common_faults(request)
        if fault is not None:
            return fault
        for name in ("pid", "it", "iv"):
            if not query.get(name):
                return _json({"error": f"missing parameter {name}"}, 400)
        if query["it"] != "19":
            return _json({"error": "unsupported envelope type (it must be 19)"}, 400)
        has_tcf = bool(query.get("ct")) and bool(query.get("cv"))
        has_gpp = bool(query.get("gpp")) and bool(query.get("gpp_sid"))
        if not (has_tcf or has_gpp):
            return _json({"error": "consent required: ct+cv or gpp+gpp_sid"}, 400)
        iv = query["iv"]
        status = self.config["refresh_status_by_iv"].get(iv)
        if status is not None:
            return _json({"error": f"injected status {status}"}, status)
        if iv in self.config["refresh_err_ivs"]:
            return _json(
                {
                    "envelopes": [
                        {
                            "type": 19,
                            "source": "envelopeLiveramp",
                            "value": None,
                            "err": "envelope refresh failed",
                        },
                        {"type": 25, "source": "pairIds", "value": None, "err": "envelope refresh failed"},
                    ]
                }
            )
        return _json(
            {
                "envelopes": [
                    {"type": 19, "source": "envelopeLiveramp", "value": _refreshed_envelope(iv), "err": None},
                    {"type": 25, "source": "pairIds", "value": _pair_id(iv), "err": None},
                ]
            }
        )

    # -- control ----------------------------------------------------------------------------

    async def received(self, request: web.Request) -> web.StreamResponse:
        fields = request.query.get("fields")
        if not fields:
            return _json({"batches": self.batches})
        paths = [f.split(".") for f in fields.split(",") if f]
        batches = [
            {
                "config_id": b["config_id"],
                "received_at": b["received_at"],
                "events": [_project(e, paths) for e in b["events"]],
            }
            for b in self.batches
        ]
        return _json({"batches": batches})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "requests": self.requests,
                "requests_by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "batches": self.batch_count,
                "events": self.event_count,
                "refresh_calls": len(self.refresh_calls),
                "max_rps": self.max_rps,
                "max_in_flight": self.max_in_flight,
                "in_flight": self.in_flight,
                "dropped": self.dropped,
                "stalled": self.stalled,
                "throttled": self.throttled,
                "rate_limited": self.rate_limited,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
            }
        )

    async def get_refresh_calls(self, request: web.Request) -> web.StreamResponse:
        return _json(self.refresh_calls)

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self._reset_records()
        return _json({"status": "reset"})

    async def get_config(self, request: web.Request) -> web.StreamResponse:
        return _json(self.config)

    async def set_config(self, request: web.Request) -> web.StreamResponse:
        try:
            update = orjson.loads(await request.read())
            if not isinstance(update, dict):
                raise ValueError("config must be a JSON object")
            update = _validate_config(update)
        except (ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        self.config.update(update)
        if "seed" in update:
            self.rng = random.Random(update["seed"])
        return _json(self.config)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/send-events/{config_id}", self.send_events)
        app.router.add_get("/api/identity/v2/envelope/refresh", self.refresh)
        app.router.add_get("/_standin/received", self.received)
        app.router.add_get("/_standin/stats", self.stats)
        app.router.add_get("/_standin/refresh-calls", self.get_refresh_calls)
        app.router.add_post("/_standin/reset", self.reset)
        app.router.add_get("/_standin/config", self.get_config)
        app.router.add_post("/_standin/config", self.set_config)
        return app


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_bind_host(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    if _is_loopback(host):
        return True
    if host.lower() != "localhost":
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(_is_loopback(str(info[4][0])) for info in infos)


def _parse_status_map(text: str) -> dict[str, int]:
    """``iv1=503,iv2=404`` or a JSON object."""
    text = text.strip()
    if text.startswith("{"):
        return {str(k): int(v) for k, v in orjson.loads(text).items()}
    result = {}
    for item in filter(None, text.split(",")):
        iv, _, status = item.rpartition("=")
        result[iv] = int(status)
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Local stand-in of LiveRamp's CAPI and envelope refresh APIs."
    )
    parser.add_argument("--port", type=int, default=8099, help="TCP port; 0 picks a free one")
    parser.add_argument(
        "--host", default="127.0.0.1", help="loopback address to bind (only loopback allowed)"
    )
    parser.add_argument(
        "--config-id",
        action="append",
        dest="config_ids",
        help="accepted ATS configuration ID (repeatable; default cfg-1)",
    )
    parser.add_argument("--latency-ms", type=float)
    parser.add_argument("--error-rate", type=float)
    parser.add_argument("--throttle-rate", type=float)
    parser.add_argument("--retry-after-seconds", type=float)
    parser.add_argument("--drop-rate", type=float)
    parser.add_argument("--stall-rate", type=float)
    parser.add_argument("--stall-seconds", type=float)
    parser.add_argument("--accept-then-stall-rate", type=float)
    parser.add_argument("--rate-limit-rps", type=float, help="sliding 1-second window limit")
    parser.add_argument("--rate", type=float, help="throttle mode: token bucket refill, requests/s")
    parser.add_argument("--burst", type=float, help="throttle mode: bucket size (default rate/10)")
    parser.add_argument("--reject-event-ids", help="comma-separated event ids whose batch gets 400")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--refresh-err-ivs", help="comma-separated envelope values answered with an err entry"
    )
    parser.add_argument(
        "--refresh-status-by-iv", type=_parse_status_map, help="iv=status,... or a JSON object"
    )
    parser.add_argument(
        "--no-keep-in-memory", action="store_true", help="do not keep batches for /_standin/received"
    )
    parser.add_argument("--config-json", type=orjson.loads, help="JSON object merged into the config first")
    parser.add_argument(
        "--record-file",
        help="append every accepted batch to this file as one JSON line (buffered: complete once the stand-in stops)",
    )
    return parser.parse_args(argv)


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = dict(args.config_json or {})
    for key in (
        "config_ids",
        "latency_ms",
        "error_rate",
        "throttle_rate",
        "retry_after_seconds",
        "drop_rate",
        "stall_rate",
        "stall_seconds",
        "accept_then_stall_rate",
        "rate_limit_rps",
        "rate",
        "burst",
        "reject_event_ids",
        "seed",
        "refresh_err_ivs",
        "refresh_status_by_iv",
    ):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if args.no_keep_in_memory:
        config["keep_in_memory"] = False
    return config


async def _serve(args: argparse.Namespace, standin: StandIn) -> None:
    # handler_cancellation: a stalled handler stops when the client gives up, as a real server would.
    runner = web.AppRunner(standin.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=4096)
    await site.start()
    sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
    port = sockets[0].getsockname()[1] if sockets else args.port
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"liveramp-standin listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if standin.record_fh is not None:
            standin.record_fh.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not _loopback_bind_host(args.host):
        print(
            f"liveramp-standin: refusing to bind {args.host!r}: only loopback addresses are allowed",
            file=sys.stderr,
        )
        return 2
    try:
        standin = StandIn(_config_from_args(args), args.record_file)
    except (ValueError, TypeError) as exc:
        print(f"liveramp-standin: invalid configuration: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(args, standin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
