"""Fixtures for the domain tests: the seed's seven example events, made concrete."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from liveramp_capi.domain.schema import EventSchemaValidator

ENVELOPE_WEB = (
    "AgNTagi_Y2T6eSlK9l3X7uJ11ib8QP2RXvpd2id5wnpjZBOvMGlVDhKsr2MrYrG6iDQHE7Gzlfx-"
    "O1fMCbKqchgakzLDkH66ETOgpeBdEx0GKzpPGRVaP22fwCLFZN1sjjnl"
)
ENVELOPE_APP = "Adsogthdhfqzjjfgttojrgkuqignabexgeorndpcgxcxwuehgvtccffzoecbcxwdtfpldast"
IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
IDFV = "1E2D3C4B-5A69-4788-9A0B-C1D2E3F4A5B6"
GAID = "38400000-8cf0-11bd-b23e-10b96e40000d"

# Values of personal fields used across tests: no rejection reason may contain any of them.
SECRET_VALUES = (
    ENVELOPE_WEB,
    ENVELOPE_APP,
    IDFA,
    IDFV,
    GAID,
    "203.0.113.77",
    "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA",
)


def _web(event_id: str, event_type: str, event_time: int, url: str, custom: list | None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_manager": ["tiktok"],
        "event_id": event_id,
        "event_type": event_type,
        "event_time": event_time,
        "event_source_url": url,
        "user_data": {"partner_id": ENVELOPE_WEB},
    }
    if custom is not None:
        event["custom_data"] = custom
    return event


def _app(
    event_type: str, event_time: int, url: str, app: dict[str, str], custom: list | None
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_type": event_type,
        "event_id": "1",
        "event_time": event_time,
        "event_source_url": url,
        "event_manager": ["tiktok"],
        "user_data": {
            "partner_id": ENVELOPE_APP,
            "idfa": IDFA,
            "idfv": IDFV,
            "gaid": GAID,
            "att_status": "AUTHORIZED",
        },
        "app_data": app,
    }
    if custom is not None:
        event["custom_data"] = custom
    return event


def _kv(**pairs: Any) -> list[dict[str, Any]]:
    return [{"key": key, "value": value} for key, value in pairs.items()]


SEED_EVENTS: list[dict[str, Any]] = [
    _web(
        "1234",
        "AddToCart",
        1714692283,
        "https://yourwebshop.com/pageId",
        _kv(
            currency="USD",
            value="1337.99",
            contents=[
                {"content_id": "15353004", "price": "11.99"},
                {"content_id": "15353005", "price": "12.99"},
            ],
        ),
    ),
    _web(
        "6543",
        "CompletePayment",
        1714692420,
        "https://yourwebshop.com/checkout",
        _kv(
            currency="USD",
            value="24.98",
            content_type="product",
            contents=[{"content_id": "SKU123", "price": "12.49"}, {"content_id": "SKU456", "price": "12.49"}],
        ),
    ),
    _web(
        "9876",
        "ViewContent",
        1714692350,
        "https://yourwebshop.com/product/XYZ456",
        _kv(
            currency="EUR", value="49.99", quantity="1", contents=[{"content_id": "XYZ456", "price": "49.99"}]
        ),
    ),
    _web("12345", "InitiateCheckout", 1744699800, "https://yourwebshop.com/checkout", None),
    _app(
        "CheckOut",
        1726475954,
        "https://www.jasna.sim.com",
        {"app_id": "com.ecommerce.mobileapp", "app_name": "ECommerceApp", "app_version": "2.1.0"},
        _kv(
            currency="EUR",
            value="49.99",
            content_type="product",
            contents=[{"content_id": "XYZ456", "price": "49.99"}],
        ),
    ),
    _app(
        "InstallApp",
        1726475954,
        "https://play.google.com/store/apps/details?id=com.example.myapp",
        {"app_id": "com.test.flyingsneakers", "app_name": "Flying Sneakers", "app_version": "3.0.2"},
        None,
    ),
    _app(
        "LaunchAPP",
        1726476500,
        "https://play.google.com/store/apps/details?id=com.fitness.workouttracker",
        {"app_id": "com.fitness.workouttracker", "app_name": "Workout Tracker", "app_version": "13.0.1"},
        None,
    ),
]


@pytest.fixture
def seed_events() -> list[dict[str, Any]]:
    """Fresh copies of the seven seed examples ({{IDFA}} etc. replaced by UUIDs)."""
    return copy.deepcopy(SEED_EVENTS)


@pytest.fixture
def web_event() -> Callable[..., dict[str, Any]]:
    """Factory: a valid web event (seed example 2) with top-level fields overridden."""

    def make(**overrides: Any) -> dict[str, Any]:
        event = copy.deepcopy(SEED_EVENTS[1])
        event.update(overrides)
        return event

    return make


@pytest.fixture
def app_event() -> Callable[..., dict[str, Any]]:
    """Factory: a valid mobile event (seed example 5) with top-level fields overridden."""

    def make(**overrides: Any) -> dict[str, Any]:
        event = copy.deepcopy(SEED_EVENTS[4])
        event.update(overrides)
        return event

    return make


@pytest.fixture(scope="session")
def schema_validator() -> EventSchemaValidator:
    return EventSchemaValidator()


@pytest.fixture
def secret_values() -> tuple[str, ...]:
    return SECRET_VALUES
