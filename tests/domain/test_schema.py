"""The event schema and EventSchemaValidator: seed examples, specific reasons, fast/reference agreement."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from liveramp_capi.domain.events import PIPELINE_FIELDS, pipeline_fields
from liveramp_capi.domain.schema import (
    EventSchemaValidator,
    fast_schema,
    load_event_schema,
)

TCF = "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"
PIPELINE = {
    "session_id": "s-1",
    "user_key": "u-42",
    "envelope_issued_at": 1714600000,
    "consent": {"ct": 4, "cv": TCF},
    "client_ip": "203.0.113.77",
}


def test_every_seed_example_is_valid(
    seed_events: list[dict[str, Any]], schema_validator: EventSchemaValidator
) -> None:
    assert len(seed_events) == 7
    for event in seed_events:
        assert schema_validator.validate(event) is None, event["event_type"]
        assert schema_validator.validate_reference(event) is None


def test_pipeline_fields_come_from_the_schema() -> None:
    assert PIPELINE_FIELDS == {"session_id", "user_key", "envelope_issued_at", "consent", "client_ip"}
    assert pipeline_fields(load_event_schema()) == PIPELINE_FIELDS


@pytest.mark.parametrize(
    "extra",
    [
        PIPELINE,
        {"consent": {"gpp": "DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA", "gpp_sid": "7,8"}},
        {"consent": {"gpp": "DBABMA~x", "gpp_sid": [7]}, "client_ip": "2001:db8::1"},
        {"consent": {"ct": 3, "cv": "1YNN"}},
    ],
)
def test_pipeline_fields_are_accepted(web_event, schema_validator: EventSchemaValidator, extra: dict) -> None:
    assert schema_validator.validate(web_event(**extra)) is None


def test_custom_data_object_form_is_valid(web_event, schema_validator: EventSchemaValidator) -> None:
    event = web_event(
        custom_data={
            "currency": "USD",
            "value": 12.5,
            "quantity": 2,
            "contents": [{"content_id": "a", "price": 6.25, "quantity": "2", "content_type": "product"}],
            "coupon": "SPRING",
            "is_member": True,
        }
    )
    assert schema_validator.validate(event) is None


def _without(path: str):
    def mutate(event: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = event
        for part in parents:
            node = node[part]
        del node[last]

    return mutate


def _set(path: str, value: Any):
    def mutate(event: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = event
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


INVALID_CASES = [
    ("ms_timestamp", "web", _set("event_time", 1714692283000), "event_time_milliseconds", "/event_time"),
    ("event_time_string", "web", _set("event_time", "1714692283"), "schema", "/event_time"),
    ("event_time_float", "web", _set("event_time", 1714692283.5), "schema", "/event_time"),
    ("event_time_too_small", "web", _set("event_time", 17146922), "schema", "/event_time"),
    ("unknown_event_type", "web", _set("event_type", "Purchse"), "unknown_event_type", "/event_type"),
    ("lowercase_event_type", "web", _set("event_type", "purchase"), "unknown_event_type", "/event_type"),
    ("event_type_number", "web", _set("event_type", 7), "schema", "/event_type"),
    ("missing_partner_id", "web", _without("user_data.partner_id"), "missing_field", "/user_data/partner_id"),
    ("missing_user_data", "web", _without("user_data"), "missing_field", "/user_data"),
    ("missing_event_id", "web", _without("event_id"), "missing_field", "/event_id"),
    ("empty_event_id", "web", _set("event_id", ""), "schema", "/event_id"),
    ("long_event_id", "web", _set("event_id", "x" * 129), "schema", "/event_id"),
    ("event_id_number", "web", _set("event_id", 1234), "schema", "/event_id"),
    ("mobile_without_app_data", "app", _without("app_data"), "missing_app_id", "/app_data/app_id"),
    ("mobile_without_app_id", "app", _without("app_data.app_id"), "missing_app_id", "/app_data/app_id"),
    ("bad_currency", "web", _set("custom_data.0.value", "usd"), "invalid_currency", "/custom_data/0/value"),
    ("value_abc", "web", _set("custom_data.1.value", "abc"), "schema", "/custom_data/1/value"),
    ("value_negative", "web", _set("custom_data.1.value", -3), "schema", "/custom_data/1/value"),
    (
        "contents_negative_price",
        "web",
        _set("custom_data.3.value.0.price", -1),
        "schema",
        "/custom_data/3/value/0/price",
    ),
    (
        "contents_unknown_field",
        "web",
        _set("custom_data.3.value.0.sku", "x"),
        "unknown_field",
        "/custom_data/3/value/0/sku",
    ),
    ("content_type_bad", "web", _set("custom_data.2.value", "products"), "schema", "/custom_data/2/value"),
    (
        "custom_entry_no_value",
        "web",
        _set("custom_data.0", {"key": "currency"}),
        "missing_field",
        "/custom_data/0/value",
    ),
    (
        "custom_other_key_object",
        "web",
        _set("custom_data.0", {"key": "x", "value": {}}),
        "schema",
        "/custom_data/0/value",
    ),
    ("custom_data_string", "web", _set("custom_data", "USD"), "schema", "/custom_data"),
    ("unknown_top_level", "web", _set("evnt_type", "Purchase"), "unknown_field", "/evnt_type"),
    ("unknown_user_data_field", "web", _set("user_data.email", "a@b.c"), "unknown_field", "/user_data/email"),
    ("partner_id_number", "web", _set("user_data.partner_id", 42), "schema", "/user_data/partner_id"),
    ("partner_id_empty", "web", _set("user_data.partner_id", ""), "schema", "/user_data/partner_id"),
    ("idfa_number", "app", _set("user_data.idfa", 123), "schema", "/user_data/idfa"),
    ("att_status_bad", "app", _set("user_data.att_status", "authorized"), "schema", "/user_data/att_status"),
    ("event_manager_no_tiktok", "web", _set("event_manager", ["meta"]), "schema", "/event_manager"),
    ("event_manager_string", "web", _set("event_manager", "tiktok"), "schema", "/event_manager"),
    ("url_not_http", "web", _set("event_source_url", "ftp://x"), "schema", "/event_source_url"),
    (
        "url_trailing_newline",
        "web",
        _set("event_source_url", "https://x.com/\n"),
        "schema",
        "/event_source_url",
    ),
    ("user_data_array", "web", _set("user_data", []), "schema", "/user_data"),
    ("client_ip_bad", "web", _set("client_ip", "203.0.113.777"), "schema", "/client_ip"),
    ("consent_ct_bad", "web", _set("consent", {"ct": 2, "cv": TCF}), "schema", "/consent/ct"),
    (
        "consent_mixed",
        "web",
        _set("consent", {"gpp": TCF, "gpp_sid": "7", "ct": 4}),
        "unknown_field",
        "/consent/ct",
    ),
    ("consent_no_cv", "web", _set("consent", {"ct": 4}), "missing_field", "/consent/cv"),
    ("session_id_empty", "web", _set("session_id", ""), "schema", "/session_id"),
    ("envelope_issued_ms", "web", _set("envelope_issued_at", 1714600000000), "schema", "/envelope_issued_at"),
    (
        "object_form_bad_currency",
        "web",
        _set("custom_data", {"currency": "DOLLAR"}),
        "invalid_currency",
        "/custom_data/currency",
    ),
    ("object_form_value_abc", "web", _set("custom_data", {"value": "abc"}), "schema", "/custom_data/value"),
    (
        "object_form_quantity_float",
        "web",
        _set("custom_data", {"quantity": 1.5}),
        "schema",
        "/custom_data/quantity",
    ),
    ("object_form_other_list", "web", _set("custom_data", {"tags": ["a"]}), "schema", "/custom_data/tags"),
]


@pytest.mark.parametrize(
    ("kind", "mutate", "code", "pointer"),
    [case[1:] for case in INVALID_CASES],
    ids=[case[0] for case in INVALID_CASES],
)
def test_invalid_records_get_specific_code_and_pointer(
    web_event, app_event, schema_validator: EventSchemaValidator, secret_values, kind, mutate, code, pointer
) -> None:
    event = (web_event if kind == "web" else app_event)(**PIPELINE)
    mutate(event)
    fast = schema_validator.validate(event)
    reference = schema_validator.validate_reference(event)
    assert fast is not None
    assert fast == reference
    assert (fast.code, fast.pointer) == (code, pointer), fast.reason
    assert fast.reason and fast.reason[0].islower() or fast.reason.startswith(("CSV",))
    for secret in secret_values:
        assert secret not in fast.reason


def test_specific_reason_wording(web_event, app_event, schema_validator: EventSchemaValidator) -> None:
    reason = schema_validator.validate(web_event(event_time=1714692283000)).reason
    assert reason == "event_time 1714692283000 looks like milliseconds; send Unix seconds (10 digits)"
    reason = schema_validator.validate(web_event(event_type="Purchse")).reason
    assert (
        "'Purchse'" in reason.replace('"', "'")
        and "case-sensitive" in reason
        and "allow_custom_events" in reason
    )
    assert 'did you mean "Purchase"' in schema_validator.validate(web_event(event_type="purchase")).reason
    event = web_event()
    del event["user_data"]["partner_id"]
    assert schema_validator.validate(event).reason == "user_data.partner_id is required"
    event = app_event()
    del event["app_data"]
    assert "mobile event needs app_data.app_id" in schema_validator.validate(event).reason
    assert 'did you mean "event_type"' in schema_validator.validate(web_event(evnt_type="x")).reason


def test_reasons_never_echo_personal_values(
    web_event, app_event, schema_validator: EventSchemaValidator
) -> None:
    weird = "SECRET-VALUE-1234567890"
    mutations = [
        {"user_data": {"partner_id": weird, "idfa": weird}},
        {"user_data": {"partner_id": [weird]}},
        {"user_data": {"partner_id": "ok", "gaid": {"x": weird}}},
        {"user_data": {"partner_id": "ok", "att_status": weird}},
        {"client_ip": weird},
        {"consent": {"ct": 4, "cv": [weird]}},
        {"consent": {"gpp": weird, "gpp_sid": weird}},
        {"consent": {"ct": weird, "cv": weird}},
        {"user_key": [weird]},
    ]
    for overrides in mutations:
        violation = schema_validator.validate(web_event(**overrides))
        assert violation is not None, overrides
        assert weird not in violation.reason, violation


def test_custom_events_option(web_event) -> None:
    strict = EventSchemaValidator()
    relaxed = EventSchemaValidator(allow_custom_events=True)
    custom = web_event(event_type="Lead_Form_Submitted2")
    assert strict.validate(custom).code == "unknown_event_type"
    assert relaxed.validate(custom) is None
    assert relaxed.validate(web_event(event_type="Purchase")) is None
    for bad in ["2Fast", "has space", "x" * 101, "", "Purchase\n"]:
        violation = relaxed.validate(web_event(event_type=bad))
        assert violation is not None and violation.pointer == "/event_type", bad
        assert relaxed.validate_reference(web_event(event_type=bad)) is not None
    # Deriving the custom schema must not touch the shipped one.
    assert "enum" in json.dumps(strict.schema["$defs"]["standard_event_type"])
    assert strict.schema["properties"]["event_type"] == {"$ref": "#/$defs/standard_event_type"}


def test_schema_declares_the_full_currency_list() -> None:
    schema = load_event_schema()
    codes = schema["$defs"]["currency"]["enum"]
    assert len(codes) == len(set(codes)) >= 170
    assert {"USD", "EUR", "JPY", "GBP", "CHF", "XCG", "ZWG", "SLE", "VES"} <= set(codes)
    assert "HRK" not in codes  # withdrawn 2023


def test_the_schema_ships_in_the_package_and_a_file_may_replace_it(tmp_path) -> None:
    from importlib import resources

    packaged = resources.files("liveramp_capi.schemas").joinpath("tiktok_event.schema.json")
    assert json.loads(packaged.read_text(encoding="utf-8")) == load_event_schema()
    edited = load_event_schema()
    edited["$defs"]["currency"]["enum"] = ["USD"]
    copy_path = tmp_path / "schema.json"
    copy_path.write_text(json.dumps(edited))
    assert load_event_schema(copy_path)["$defs"]["currency"]["enum"] == ["USD"]
    # Copies are private: editing one never changes what the next caller gets.
    assert len(load_event_schema()["$defs"]["currency"]["enum"]) > 1
    with pytest.raises(FileNotFoundError):
        load_event_schema(tmp_path / "missing.json")


# ------------------------------------------------------------------ differential corpus

_NASTY_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.0,
    1.5,
    -0.0,
    10**30,
    1e300,
    "",
    " ",
    "x",
    "1337.99",
    "1337.",
    ".5",
    "12\n",
    "USD",
    "usd",
    "product",
    "Purchase",
    "purchase",
    "https://x.com/a",
    "https://x.com/a b",
    "http://x\n",
    "1.2.3.4",
    "::1",
    "fe80::1%eth0",
    "01.2.3.4",
    "7,8",
    "7,8\n",
    "AUTHORIZED",
    "\u00e9\u00e8",
    "\ud800",
    [],
    ["tiktok"],
    [1, 2],
    {},
    {"key": "value", "value": "1"},
    {"key": "currency", "value": "EUR"},
    {"content_id": "a", "price": "1.0"},
    1714692283,
    1714692283000,
    1714692283.0,
    "1714692283",
    # custom_data keys with their own value rules (the fast validator dispatches on them)
    "currency",
    "contents",
    "quantity",
    "content_type",
    "order_id",
]

_PATHS: list[tuple[str, ...]] = [
    ("event_manager",),
    ("event_manager", 0),
    ("event_id",),
    ("event_type",),
    ("event_time",),
    ("event_source_url",),
    ("user_data",),
    ("user_data", "partner_id"),
    ("user_data", "idfa"),
    ("user_data", "gaid"),
    ("user_data", "att_status"),
    ("user_data", "extra"),
    ("app_data",),
    ("app_data", "app_id"),
    ("app_data", "app_version"),
    ("custom_data",),
    ("custom_data", 0),
    ("custom_data", 0, "value"),
    ("custom_data", 1, "value"),
    ("custom_data", 2, "value"),
    ("custom_data", 3, "value"),
    ("custom_data", 3, "value", 0, "price"),
    ("custom_data", 3, "value", 0, "quantity"),
    ("custom_data", 0, "key"),
    ("session_id",),
    ("user_key",),
    ("envelope_issued_at",),
    ("consent",),
    ("consent", "ct"),
    ("consent", "gpp_sid"),
    ("client_ip",),
    ("unknown",),
]


def _mutate(rng: random.Random, event: dict[str, Any]) -> dict[str, Any]:
    event = copy.deepcopy(event)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        path = rng.choice(_PATHS)
        node: Any = event
        for part in path[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        last = path[-1]
        if isinstance(node, dict) and isinstance(last, str):
            if rng.random() < 0.2 and last in node:
                del node[last]
            else:
                node[last] = copy.deepcopy(rng.choice(_NASTY_VALUES))
        elif isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = copy.deepcopy(rng.choice(_NASTY_VALUES))
    if rng.random() < 0.3:
        custom = event.get("custom_data")
        if isinstance(custom, list):
            event["custom_data"] = {
                e.get("key", "k"): e.get("value")
                for e in custom
                if isinstance(e, dict) and isinstance(e.get("key"), str)
            }
    return event


def test_fast_schema_rewrites_the_custom_data_dispatch_only() -> None:
    schema = load_event_schema()
    fast = fast_schema(schema)
    entry = fast["$defs"]["custom_data_entry"]
    assert "allOf" not in entry and len(entry["anyOf"]) == len(schema["$defs"]["custom_data_entry"]["allOf"])
    # Everything else is untouched.
    assert {k: v for k, v in fast["$defs"].items() if k != "custom_data_entry"} == {
        k: v for k, v in schema["$defs"].items() if k != "custom_data_entry"
    }
    assert fast["properties"] == schema["properties"] and fast["allOf"] == schema["allOf"]
    # A table that is not exhaustive is left alone.
    partial = {"type": "object", "required": ["key"], "properties": {"key": {"type": "string"}},
               "allOf": [{"if": {"properties": {"key": {"const": "a"}}, "required": ["key"]},
                          "then": {"properties": {"value": {"type": "string"}}}},
                         {"if": {"properties": {"key": {"const": "b"}}, "required": ["key"]},
                          "then": {"properties": {"value": {"type": "number"}}}}]}
    assert fast_schema(partial) == partial


def test_fast_and_reference_validators_agree(seed_events: list[dict[str, Any]]) -> None:
    rng = random.Random(20240503)
    validators = [EventSchemaValidator(), EventSchemaValidator(allow_custom_events=True)]
    bases = [dict(event, **copy.deepcopy(PIPELINE)) for event in seed_events] + seed_events
    corpus = list(bases) + [_mutate(rng, rng.choice(bases)) for _ in range(600)]
    outcomes = {"valid": 0, "invalid": 0, "fallback": 0}
    for record in corpus:
        for validator in validators:
            fast = validator.validate(record)
            reference = validator.validate_reference(record)
            assert (fast is None) == (reference is None), (record, fast, reference)
            # The fast path finds the reference's message, not just its verdict.
            assert fast == reference, (record, fast, reference)
            try:
                fast_only = validator._fast.is_valid(record)
            except ValueError:
                # Lone surrogates cannot cross into Rust; validate() falls back to the reference.
                outcomes["fallback"] += 1
            else:
                assert fast_only == (reference is None), (record, reference)
            outcomes["valid" if fast is None else "invalid"] += 1
    # The corpus must exercise both sides.
    assert outcomes["valid"] > 100 and outcomes["invalid"] > 300, outcomes
