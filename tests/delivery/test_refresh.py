"""The envelope refresher and its hook against the local stand-in over real HTTP."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from liveramp_capi.delivery.refresh import (
    REASON_CONSENT_MISSING,
    REASON_ERR_ENTRY,
    REASON_NO_TYPE_19,
    EnvelopeRefresher,
    parse_refresh_body,
)
from liveramp_capi.delivery.settings import CapiConfigError, CapiSettings
from liveramp_capi.domain.consent import Consent
from liveramp_capi.domain.envelopes import StoredEnvelope

NOW = 1_790_000_000
TCF = Consent(ct=4, cv="CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA")
GPP = Consent(gpp="DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA", gpp_sid="8")
FAST = CapiSettings(concurrency=16, timeout_seconds=3, max_attempts=3, backoff_base_seconds=0.01,
                    backoff_max_seconds=0.05, verify_tls=True)


def row(key: str, envelope: str, consent: Consent | None = TCF, ip: str | None = "203.0.113.7") -> StoredEnvelope:
    return StoredEnvelope(key, envelope, NOW, NOW + 86400, consent, ip, "active")


def refresh(standin, rows, settings: CapiSettings = FAST, **kwargs):
    outcomes = []
    refresher = EnvelopeRefresher(standin.url, "pid-123", settings, origin="https://shop.example",
                                  rng=random.Random(1), **kwargs)
    stats = refresher.refresh_sync(rows, outcomes.append)
    return {o.row.user_key: o for o in outcomes}, stats


def test_parse_refresh_body_reads_the_documented_shape() -> None:
    ok = b'{"envelopes":[{"type":19,"source":"envelopeLiveramp","value":"NEW","err":null},{"type":25,"value":"p","err":null}]}'
    assert parse_refresh_body(ok) == ("NEW", None)
    assert parse_refresh_body(b'{"envelopes":[{"type":19,"value":null,"err":"boom"}]}') == (None, REASON_ERR_ENTRY)
    assert parse_refresh_body(b'{"envelopes":[{"type":25,"value":"p","err":null}]}') == (None, REASON_NO_TYPE_19)
    assert parse_refresh_body(b"not json")[0] is None
    assert parse_refresh_body(b'{"envelopes": 3}')[0] is None


def test_refresh_against_the_standin_err_4xx_and_no_consent(standin) -> None:
    standin.config(refresh_err_ivs=["E-err"], refresh_status_by_iv={"E-400": 400})
    rows = [row("ok", "E-ok"), row("gpp", "E-gpp", GPP), row("err", "E-err"), row("bad", "E-400"),
            row("none", "E-none", None)]
    outcomes, stats = refresh(standin, rows)
    assert outcomes["ok"].refreshed and outcomes["ok"].envelope.startswith("R1.")
    assert outcomes["gpp"].refreshed
    assert (outcomes["err"].refreshed, outcomes["err"].reason) == (False, REASON_ERR_ENTRY)
    assert (outcomes["bad"].reason, outcomes["bad"].attempts) == ("HTTP 400", 1)
    assert outcomes["none"].skipped and outcomes["none"].reason == REASON_CONSENT_MISSING
    assert (stats.refreshed, stats.failed, stats.skipped_consent) == (2, 2, 1)
    calls = standin.refresh_calls()
    assert len(calls) == 4 and "E-none" not in {c["iv"] for c in calls}
    for call in calls:
        assert call["pid"] == "pid-123" and call["it"] == "19"
        assert ("ct" in call and "cv" in call) or ("gpp" in call and "gpp_sid" in call)
    assert {c["iv"]: c.get("gpp_sid") for c in calls}["E-gpp"] == "8"
    # Nothing identifying in the outcomes' text.
    for outcome in outcomes.values():
        assert "E-" not in repr(outcome) and "CPXx" not in repr(outcome)


def test_refresh_under_a_token_bucket_backs_off_like_the_sender(standin) -> None:
    # The refresher runs the same engine: a bucket of 100 requests/s lowers its rate too.
    standin.config(rate=100, burst=10, latency_ms=10)
    settings = dataclasses.replace(FAST, concurrency=32, max_attempts=0)
    outcomes, stats = refresh(standin, [row(f"u{i}", f"E-{i}") for i in range(300)], settings)
    assert all(o.refreshed for o in outcomes.values()) and len(outcomes) == 300
    assert stats.throttled > 0 and stats.rate_decreases >= 1
    assert stats.requests == 300 + stats.retries and stats.throttled <= 0.25 * stats.requests
    assert len(standin.refresh_calls()) == stats.requests


def test_refresh_rate_against_the_standin_with_latency(standin) -> None:
    import time

    standin.config(latency_ms=20)
    settings = dataclasses.replace(FAST, concurrency=64)
    started = time.perf_counter()
    outcomes, stats = refresh(standin, [row(f"u{i}", f"E-{i}") for i in range(1500)], settings)
    elapsed = time.perf_counter() - started
    assert stats.refreshed == 1500
    print(f"\n[refresh] 1500 rows, 20 ms latency, 64 in flight: {1500 / elapsed:,.0f} calls/s")


def test_hook_reads_pid_origin_and_keeps_tuning_out_of_headers(monkeypatch) -> None:
    from liveramp_capi.hooks.envelope import DEFAULT_REFRESH_RPS, LiveRampEnvelopeHook

    extra = {"pid": "p-1", "origin": "https://shop.example", "concurrency": 8, "X-Team": "growth"}
    monkeypatch.setenv("AIRFLOW_CONN_LIVERAMP_ENVELOPE_DEFAULT",
                       json.dumps({"conn_type": "liveramp_envelope", "host": "http://127.0.0.1:9", "extra": extra}))
    config = LiveRampEnvelopeHook().get_refresh_config()
    assert (config.base_url, config.placement_id, config.origin) == ("http://127.0.0.1:9", "p-1", "https://shop.example")
    assert config.headers == {"X-Team": "growth"}
    assert config.settings.concurrency == 8 and config.settings.max_requests_per_second == DEFAULT_REFRESH_RPS
    session = LiveRampEnvelopeHook().get_conn()
    assert not {"pid", "origin", "concurrency"} & {k.lower() for k in session.headers}

    monkeypatch.setenv("AIRFLOW_CONN_LIVERAMP_ENVELOPE_DEFAULT",
                       json.dumps({"conn_type": "liveramp_envelope", "extra": {"origin": "x"}}))
    hook = LiveRampEnvelopeHook()
    with pytest.raises(CapiConfigError, match="pid"):
        hook.get_refresh_config()
    assert hook._base_url_of(hook.get_connection("liveramp_envelope_default")) == "https://api.rlcdn.com"
