"""Metrics reach a real StatsD listener (UDP on loopback) from a real ``tiktok_conversions`` run
against a stand-in that throttles: delivered, rejected by reason, requests, 429s, retries and the
send duration, under the documented names."""

from __future__ import annotations

import re
import socket
import time
from collections import Counter

import pytest

from capi_devtools.sample_partition import stage_sample_partition
from capi_devtools.standin_fixture import running_standin
from tests.support.conversions_run import configure_pipeline, output_json, run_conversions, yesterday

pytestmark = pytest.mark.airflow

_LINE = re.compile(r"^airflow\.(capi\.[a-z0-9_.]+):([0-9.]+)\|(c|ms)")


@pytest.fixture
def statsd_listener(monkeypatch):
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics.stats_utils import get_stats_factory

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_ON", "True")
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_HOST", "127.0.0.1")
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PORT", str(sock.getsockname()[1]))
    stats.initialize(factory=get_stats_factory(), export_legacy_names=False)
    try:
        yield sock
    finally:
        monkeypatch.undo()
        stats.initialize(factory=get_stats_factory(), export_legacy_names=False)
        sock.close()


def _received(sock: socket.socket) -> tuple[Counter, dict[str, list[float]]]:
    counters: Counter = Counter()
    timings: dict[str, list[float]] = {}
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            packet = sock.recv(65536).decode()
        except TimeoutError:
            continue
        for line in packet.splitlines():
            match = _LINE.match(line)
            if match and match.group(3) == "c":
                counters[match.group(1)] += int(float(match.group(2)))
            elif match:
                timings.setdefault(match.group(1), []).append(float(match.group(2)))
    return counters, timings


def test_a_run_emits_the_documented_metrics(airflow_db, statsd_listener, tmp_path, monkeypatch):
    partition = yesterday()
    with running_standin("--throttle-rate", "0.3", "--retry-after-seconds", "0", "--seed", "7") as standin:
        configure_pipeline(monkeypatch, tmp_path, standin, max_attempts=8)
        stage_sample_partition(tmp_path / "landing", partition)
        assert run_conversions(partition) == "success"
        answered = standin.stats()["requests_by_status"]
    summary = output_json(tmp_path, partition, "summary.json")
    counters, timings = _received(statsd_listener)

    assert counters["capi.events.received"] == summary["read"]
    assert counters["capi.events.valid"] == summary["valid"]
    assert counters["capi.events.rejected"] == summary["rejected"]
    for code, count in summary["rejected_by_reason"].items():
        assert counters[f"capi.events.rejected.{code}"] == count
    assert counters["capi.events.delivered"] == summary["delivered_events"]
    assert counters["capi.requests"] == summary["requests"]
    assert counters["capi.requests.retries"] == summary["retries"] > 0
    assert counters["capi.requests.throttled"] == answered.get("429", 0) > 0
    assert "capi.events.failed" not in counters
    assert timings["capi.send.duration"] and all(ms > 0 for ms in timings["capi.send.duration"])
