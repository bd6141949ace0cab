"""The local LiveRamp stand-in itself: endpoints, faults and control API (plain urllib calls)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from capi_devtools.standin_fixture import STANDIN_SCRIPT, running_standin

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, method: str = "GET", payload: object | bytes | None = None) -> tuple[int, dict, dict]:
    data = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def send(
    standin, events: list | None, config_id: str | None = None, raw: bytes | None = None
) -> tuple[int, dict, dict]:
    url = f"{standin.url}/send-events/{config_id or standin.config_id}"
    return call(url, "POST", raw if raw is not None else {"events": events})


def refresh_url(standin, **params: str) -> str:
    return f"{standin.url}/api/identity/v2/envelope/refresh?{urllib.parse.urlencode(params)}"


def test_accepts_a_valid_batch_and_records_it(standin) -> None:
    events = [
        {"event_id": "1", "event_type": "AddToCart", "user_data": {"partner_id": "env-1"}},
        {"event_id": "2"},
    ]
    status, _, answer = send(standin, events)
    assert (status, answer) == (200, {"status": "ok", "events_received": 2})
    [batch] = standin.received()
    assert batch["events"] == events and batch["config_id"] == standin.config_id and batch["received_at"] > 0
    trimmed = standin.received(fields="event_id,user_data.partner_id")
    assert trimmed[0]["events"] == [
        {"event_id": "1", "user_data": {"partner_id": "env-1"}},
        {"event_id": "2"},
    ]
    stats = standin.stats()
    assert stats["batches"] == 1 and stats["events"] == 2 and stats["requests_by_status"] == {"200": 1}
    assert stats["max_rps"] >= 1 and stats["max_in_flight"] == 1


def test_unknown_configuration_id(standin) -> None:
    status, _, answer = send(standin, [{"event_id": "1"}], config_id="cfg-other")
    assert (status, answer) == (404, {"error": "unknown configuration id"})
    assert standin.received() == []


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"events": []}',
        b'{"events": "x"}',
        b"[1, 2]",
        b'{"events": [{"event_type": "AddToCart"}]}',
        json.dumps({"events": [{"event_id": str(i)} for i in range(1001)]}).encode(),
    ],
)
def test_malformed_batches_get_400(standin, raw: bytes) -> None:
    status, _, answer = send(standin, None, raw=raw)
    assert status == 400 and "error" in answer
    assert standin.received() == []


def test_rejected_event_id(standin) -> None:
    standin.config(reject_event_ids=["bad-1"])
    status, _, answer = send(standin, [{"event_id": "ok"}, {"event_id": "bad-1"}])
    assert (status, answer) == (400, {"error": "invalid event", "event_id": "bad-1"})


def test_throttle_and_errors(standin) -> None:
    standin.config(throttle_rate=1.0, retry_after_seconds=3)
    status, headers, _ = send(standin, [{"event_id": "1"}])
    assert status == 429 and headers["Retry-After"] == "3"
    standin.config(throttle_rate=0.0, error_rate=1.0)
    assert send(standin, [{"event_id": "1"}])[0] in (500, 502, 503)
    assert standin.received() == []
    assert standin.stats()["throttled"] == 1


def test_rate_limit(standin) -> None:
    standin.config(rate_limit_rps=3)
    statuses = [send(standin, [{"event_id": str(i)}])[0] for i in range(6)]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
    assert standin.stats()["rate_limited"] >= 1


def test_drop_closes_the_connection_without_an_answer(standin) -> None:
    standin.config(drop_rate=1.0)
    for _ in range(4):
        with pytest.raises((OSError, http.client.HTTPException)):
            send(standin, [{"event_id": "1"}])
    assert standin.received() == [] and standin.stats()["dropped"] == 4


def test_config_merge_validation_and_reset(standin) -> None:
    config = standin.config(latency_ms=5, seed=4)
    assert config["latency_ms"] == 5 and config["seed"] == 4 and config["config_ids"] == [standin.config_id]
    status, _, answer = call(f"{standin.url}/_standin/config", "POST", {"error_rate": 2})
    assert status == 400 and "error_rate" in answer["error"]
    status, _, answer = call(f"{standin.url}/_standin/config", "POST", {"nope": 1})
    assert status == 400 and "nope" in answer["error"]
    send(standin, [{"event_id": "1"}])
    standin.reset()
    assert standin.received() == [] and standin.stats()["requests"] == 0
    assert call(f"{standin.url}/_standin/config")[2]["latency_ms"] == 5  # config survives a reset


def test_refresh_returns_the_documented_shape(standin) -> None:
    status, _, answer = call(
        refresh_url(standin, pid="p1", it="19", iv="old-envelope", ct="4", cv="CPXxRfAPXxRfAAfKABENB")
    )
    assert status == 200
    first, second = answer["envelopes"]
    assert first["type"] == 19 and first["source"] == "envelopeLiveramp" and first["err"] is None
    assert first["value"].startswith("R1.") and first["value"] != "old-envelope"
    assert second["type"] == 25 and second["source"] == "pairIds" and second["err"] is None
    again = call(refresh_url(standin, pid="p1", it="19", iv="old-envelope", gpp="DBABMA~CPX", gpp_sid="7"))[2]
    assert again["envelopes"][0]["value"] == first["value"]  # deterministic
    other = call(refresh_url(standin, pid="p1", it="19", iv="another", ct="3", cv="1YNN"))[2]
    assert other["envelopes"][0]["value"] != first["value"]
    calls = standin.refresh_calls()
    assert calls[0] == {
        "pid": "p1",
        "it": "19",
        "iv": "old-envelope",
        "ct": "4",
        "cv": "CPXxRfAPXxRfAAfKABENB",
    }
    assert len(calls) == 3 and standin.stats()["refresh_calls"] == 3
    expected = base64.urlsafe_b64encode(hashlib.sha256(b"old-envelope").digest()).decode().rstrip("=")
    assert first["value"] == "R1." + expected  # the derivation the stand-in documents


@pytest.mark.parametrize(
    "params",
    [
        {"it": "19", "iv": "e", "ct": "4", "cv": "c"},
        {"pid": "p", "iv": "e", "ct": "4", "cv": "c"},
        {"pid": "p", "it": "19", "ct": "4", "cv": "c"},
        {"pid": "p", "it": "24", "iv": "e", "ct": "4", "cv": "c"},
        {"pid": "p", "it": "19", "iv": "e"},
        {"pid": "p", "it": "19", "iv": "e", "ct": "4"},
        {"pid": "p", "it": "19", "iv": "e", "gpp": "x"},
    ],
)
def test_refresh_rejects_bad_queries(standin, params: dict) -> None:
    status, _, answer = call(refresh_url(standin, **params))
    assert status == 400 and "error" in answer


def test_refresh_configured_failures(standin) -> None:
    standin.config(refresh_err_ivs=["env-err"], refresh_status_by_iv={"env-503": 503, "env-404": 404})
    base = {"pid": "p", "it": "19", "ct": "4", "cv": "c"}
    answer = call(refresh_url(standin, iv="env-err", **base))
    assert (
        answer[0] == 200 and answer[2]["envelopes"][0]["err"] and answer[2]["envelopes"][0]["value"] is None
    )
    assert call(refresh_url(standin, iv="env-503", **base))[0] == 503
    assert call(refresh_url(standin, iv="env-404", **base))[0] == 404
    assert call(refresh_url(standin, iv="env-ok", **base))[0] == 200


def test_cli_flags_and_record_file(tmp_path) -> None:
    record = tmp_path / "batches.jsonl"
    with running_standin(
        "--latency-ms", "1", "--reject-event-ids", "r1,r2", "--refresh-status-by-iv", "bad=502",
        "--record-file", str(record), "--no-keep-in-memory",
    ) as standin:  # fmt: skip
        config = call(f"{standin.url}/_standin/config")[2]
        assert config["reject_event_ids"] == ["r1", "r2"] and config["refresh_status_by_iv"] == {"bad": 502}
        assert config["latency_ms"] == 1 and config["keep_in_memory"] is False
        assert send(standin, [{"event_id": "a"}])[0] == 200
        assert send(standin, [{"event_id": "r2"}])[0] == 400
        assert send(standin, [{"event_id": "b"}, {"event_id": "c"}])[0] == 200
        assert standin.received() == [] and standin.stats()["batches"] == 2
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [[e["event_id"] for e in line["events"]] for line in lines] == [["a"], ["b", "c"]]


@pytest.mark.parametrize("host", ["0.0.0.0", "8.8.8.8", "example.com"])
def test_refuses_non_loopback_addresses(host: str) -> None:
    result = subprocess.run(
        [sys.executable, str(STANDIN_SCRIPT), "--host", host, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "loopback" in result.stderr
    assert "listening" not in result.stdout


def test_docstring_says_it_is_a_stand_in() -> None:
    assert "STAND-IN" in STANDIN_SCRIPT.read_text().split('"""')[1]
    assert "import liveramp_capi" not in STANDIN_SCRIPT.read_text()
