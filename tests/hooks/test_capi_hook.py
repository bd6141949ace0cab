"""LiveRampCapiHook with connections defined by AIRFLOW_CONN_* environment variables."""

from __future__ import annotations

import json
import logging
import socket

import orjson
import pytest
from airflow.providers.http.hooks.http import HttpHook

from liveramp_capi.delivery.sender import DeliveryOutcome
from liveramp_capi.delivery.settings import TUNING_KEYS, CapiConfigError
from liveramp_capi.domain.batches import Batch
from liveramp_capi.hooks.capi import CapiRequestError, LiveRampCapiHook
from liveramp_capi.hooks.envelope import LiveRampEnvelopeHook

ENV = "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT"


def set_connection(
    monkeypatch, *, host: str | None, password: str | None, extra: dict | None = None, env: str = ENV
) -> None:
    conn: dict = {"conn_type": "liveramp_capi"}
    if host is not None:
        conn["host"] = host
    if password is not None:
        conn["password"] = password
    if extra is not None:
        conn["extra"] = extra
    monkeypatch.setenv(env, json.dumps(conn))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RecordingLogger:
    """Stands in for the hook's structlog logger (Airflow's logs bypass caplog), keeping every call."""

    def __init__(self) -> None:
        self.records: list[tuple[int, str]] = []

    def _record(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        text = str(msg) % args if args else str(msg)
        self.records.append((level, f"{text} {kwargs.get('exc_info', '')}"))

    def debug(self, msg: object, *args: object, **kwargs: object) -> None:
        self._record(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg: object, *args: object, **kwargs: object) -> None:
        self._record(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg: object, *args: object, **kwargs: object) -> None:
        self._record(logging.WARNING, msg, *args, **kwargs)

    def error(self, msg: object, *args: object, **kwargs: object) -> None:
        self._record(logging.ERROR, msg, *args, **kwargs)

    def exception(self, msg: object, *args: object, **kwargs: object) -> None:
        self._record(logging.ERROR, msg, *args, **kwargs)

    def text(self, min_level: int = logging.INFO) -> str:
        return "\n".join(text for level, text in self.records if level >= min_level)


def recording_hook() -> tuple[LiveRampCapiHook, RecordingLogger]:
    hook = LiveRampCapiHook()
    recorder = RecordingLogger()
    hook._log = recorder  # type: ignore[assignment]
    return hook, recorder


def body(*event_ids: str) -> bytes:
    return orjson.dumps(
        {"events": [{"event_id": e, "user_data": {"partner_id": "ENVELOPE-SECRET"}} for e in event_ids]}
    )


def test_class_attributes_and_form() -> None:
    assert LiveRampCapiHook.conn_type == "liveramp_capi"
    assert LiveRampCapiHook.conn_name_attr == "liveramp_capi_conn_id"
    assert LiveRampCapiHook.default_conn_name == "liveramp_capi_default"


def test_settings_and_headers_from_the_connection(monkeypatch) -> None:
    set_connection(
        monkeypatch,
        host="http://127.0.0.1:8099/",
        password="cfg-secret-1234",
        extra={"concurrency": 7, "max_attempts": 2, "timeout_seconds": 3, "X-Team": "growth", "timeout": 5},
    )
    hook = LiveRampCapiHook()
    config = hook.get_delivery_config()
    assert config.base_url == "http://127.0.0.1:8099"
    assert config.config_id == "cfg-secret-1234"
    assert hook.get_settings().concurrency == 7 and config.settings.timeout_seconds == 3
    assert config.headers == {"X-Team": "growth"}
    assert "cfg-secret-1234" not in repr(config)
    base_url, config_id, settings, headers = config
    assert (base_url, config_id, settings.max_attempts) == ("http://127.0.0.1:8099", "cfg-secret-1234", 2)


def test_tuning_keys_never_become_session_headers(monkeypatch) -> None:
    extra = {
        key: value for key, value in [("concurrency", 4), ("max_batch_events", 20), ("verify_tls", True)]
    }
    extra["X-Team"] = "growth"
    set_connection(monkeypatch, host="http://127.0.0.1:8099", password="cfg-secret-1234", extra=extra)
    session = LiveRampCapiHook().get_conn()
    assert session.headers["X-Team"] == "growth"
    assert not {k.lower() for k in session.headers} & TUNING_KEYS
    assert session.verify is True


def test_http_options_of_the_extra_shape_the_session_and_run_options_win(monkeypatch) -> None:
    extra = {"max_redirects": 3, "trust_env": False, "proxies": {"https": "http://127.0.0.1:3128"}, "timeout": 7}
    set_connection(monkeypatch, host="http://127.0.0.1:8099", password="cfg-secret-1234", extra=extra)
    hook = LiveRampCapiHook()
    session = hook.get_conn(headers={"X-Call": "1"}, extra_options={"timeout": 2, "check_response": False})
    assert (session.max_redirects, session.trust_env) == (3, False)
    assert session.proxies == {"https": "http://127.0.0.1:3128"}
    assert session.headers["X-Call"] == "1"
    assert not {"max_redirects", "trust_env", "proxies", "timeout"} & {k.lower() for k in session.headers}
    # HttpHook.run() sends with these: the call's options over the connection's.
    assert hook.merged_extra["timeout"] == 2 and hook.merged_extra["check_response"] is False
    assert hook.url_from_endpoint("send-events/x") == "http://127.0.0.1:8099/send-events/x"
    assert hook.liveramp_capi_conn_id == "liveramp_capi_default"


def test_the_hooks_override_no_private_member_of_httphook() -> None:
    # The provider's private methods may change in any release; only its public surface is ours.
    private = {name for name in vars(HttpHook) if name.startswith("_") and not name.startswith("__")}
    for hook in (LiveRampCapiHook, LiveRampEnvelopeHook):
        ours = hook.__mro__[: hook.__mro__.index(HttpHook)]
        assert not private & {name for klass in ours for name in vars(klass)}, hook


def test_default_host_is_liveramp_over_https(monkeypatch) -> None:
    set_connection(monkeypatch, host=None, password="cfg-secret-1234")
    assert LiveRampCapiHook().get_delivery_config().base_url == "https://capi.analytics.rlcdn.com"
    set_connection(monkeypatch, host="capi.example.test", password="cfg-secret-1234")
    assert LiveRampCapiHook().get_delivery_config().base_url == "https://capi.example.test"


def test_missing_configuration_id_is_a_clear_error(monkeypatch) -> None:
    set_connection(monkeypatch, host="http://127.0.0.1:8099", password=None)
    with pytest.raises(
        CapiConfigError, match=r"connection liveramp_capi_default has no ATS configuration ID \(password\)"
    ):
        LiveRampCapiHook().get_delivery_config()
    ok, message = LiveRampCapiHook().test_connection()
    assert not ok and "no ATS configuration ID" in message


def test_invalid_extra_names_the_key_not_the_secret(monkeypatch) -> None:
    set_connection(
        monkeypatch,
        host="http://127.0.0.1:8099",
        password="cfg-secret-1234",
        extra={"max_batch_events": 5000},
    )
    with pytest.raises(CapiConfigError, match="max_batch_events") as info:
        LiveRampCapiHook().get_settings()
    assert "cfg-secret-1234" not in str(info.value)


def test_verify_tls_false_refused_for_a_remote_host(monkeypatch) -> None:
    set_connection(
        monkeypatch,
        host="https://capi.analytics.rlcdn.com",
        password="cfg-secret-1234",
        extra={"verify_tls": False},
    )
    with pytest.raises(CapiConfigError, match="loopback"):
        LiveRampCapiHook().get_settings()
    set_connection(
        monkeypatch,
        host="https://capi.analytics.rlcdn.com",
        password="cfg-secret-1234",
        extra={"verify": False},
    )
    with pytest.raises(CapiConfigError, match="verify_tls"):
        LiveRampCapiHook().get_settings()


def test_send_batches_through_the_hook(monkeypatch, standin) -> None:
    set_connection(
        monkeypatch,
        host=standin.url,
        password=standin.config_id,
        extra={"concurrency": 4, "X-Team": "growth"},
    )
    outcomes: list[DeliveryOutcome] = []
    batches = [Batch(f"b{i}", 0, (f"e{i}",), body(f"e{i}")) for i in range(10)]
    stats = LiveRampCapiHook().send_batches(iter(batches), lambda batch, outcome: outcomes.append(outcome))
    assert stats.batches_acknowledged == 10 and all(o.acknowledged for o in outcomes)
    assert sorted(standin.received_event_ids()) == sorted(f"e{i}" for i in range(10))


def test_send_batch_sequential(monkeypatch, standin, caplog, capfd) -> None:
    caplog.set_level(logging.INFO)
    set_connection(monkeypatch, host=standin.url, password=standin.config_id, extra={"concurrency": 4})
    hook, recorder = recording_hook()
    assert hook.send_batch_sequential(body("s1", "s2")) == 200
    standin.config(reject_event_ids=["bad"])
    assert hook.send_batch_sequential(body("bad")) == 400
    assert standin.received_event_ids() == ["s1", "s2"]
    out, err = capfd.readouterr()
    for text in (caplog.text, recorder.text(), out, err):
        assert standin.config_id not in text


def test_sequential_unknown_configuration_id_returns_404(monkeypatch, standin) -> None:
    set_connection(monkeypatch, host=standin.url, password="cfg-not-known-3344")
    assert LiveRampCapiHook().send_batch_sequential(body("x")) == 404


def test_test_connection_against_the_standin(monkeypatch, standin) -> None:
    set_connection(monkeypatch, host=standin.url, password=standin.config_id)
    ok, message = LiveRampCapiHook().test_connection()
    assert ok, message
    assert standin.config_id not in message
    assert standin.received() == []  # nothing was posted


def test_failures_never_reveal_the_configuration_id(monkeypatch, caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG, logger="liveramp_capi")
    caplog.set_level(logging.INFO)
    secret = "cfg-topsecret-8e2f41"
    port = closed_port()
    set_connection(
        monkeypatch,
        host=f"http://127.0.0.1:{port}",
        password=secret,
        extra={
            "max_attempts": 2,
            "backoff_base_seconds": 0.01,
            "backoff_max_seconds": 0.01,
            "concurrency": 2,
        },
    )
    hook, recorder = recording_hook()
    with pytest.raises(CapiRequestError) as info:
        hook.send_batch_sequential(body("x"))
    assert secret not in str(info.value) and "ConnectionError" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__

    outcomes: list[DeliveryOutcome] = []
    stats = hook.send_batches([Batch("b0", 0, ("x",), body("x"))], lambda batch, outcome: outcomes.append(outcome))
    assert stats.batches_failed == 1
    # The endpoint is named by host:port (where to look), never by its path (the secret).
    assert outcomes[0].error == f"retries exhausted: connection error (ClientConnectorError) with 127.0.0.1:{port}"

    ok, message = hook.test_connection()
    assert not ok and message == "base URL not reachable (ConnectionError)"
    # HttpHook itself logs the URL at DEBUG only; nothing at INFO or above may hold the ID.
    assert any(secret in text for _, text in recorder.records), "the recorder did not see the hook's logs"
    out, err = capfd.readouterr()
    texts = (caplog.text, recorder.text(), out, err, repr(outcomes), message)
    for text in (*texts, repr(hook.get_delivery_config()), repr(hook.get_sender())):
        assert secret not in text
        assert "ENVELOPE-SECRET" not in text


def test_get_conn_also_refuses_verify_tls_false_for_a_remote_host(monkeypatch) -> None:
    set_connection(
        monkeypatch,
        host="https://capi.analytics.rlcdn.com",
        password="cfg-secret-1234",
        extra={"verify_tls": False},
    )
    with pytest.raises(CapiConfigError, match="loopback"):
        LiveRampCapiHook().get_conn()
    set_connection(
        monkeypatch, host="http://127.0.0.1:8099", password="cfg-secret-1234", extra={"verify_tls": False}
    )
    assert LiveRampCapiHook().get_conn().verify is False
