"""The installed package registers itself as an Airflow provider with its own connection forms."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def providers():
    from airflow.providers_manager import ProvidersManager

    return ProvidersManager()


def test_package_is_a_registered_provider(providers) -> None:
    assert "liveramp-capi" in providers.providers


@pytest.mark.parametrize(
    ("conn_type", "hook_class"),
    [
        ("liveramp_capi", "liveramp_capi.hooks.capi.LiveRampCapiHook"),
        ("capi_state", "liveramp_capi.hooks.state.CapiStateHook"),
    ],
)
def test_connection_types_have_hooks_and_forms(providers, conn_type: str, hook_class: str) -> None:
    hook = providers.hooks[conn_type]
    assert hook is not None and hook.package_name == "liveramp-capi"
    assert f"{hook.hook_class_name}" == hook_class
    behaviour = providers.field_behaviours[conn_type]
    assert set(behaviour) == {"hidden_fields", "relabeling", "placeholders"}
    assert behaviour["relabeling"]["host"]


def test_capi_form_names_the_secret_for_what_it_is(providers) -> None:
    import json

    from liveramp_capi.delivery.settings import TUNING_KEYS

    behaviour = providers.field_behaviours["liveramp_capi"]
    assert behaviour["relabeling"] == {"host": "Base URL", "password": "ATS configuration ID"}
    assert set(behaviour["hidden_fields"]) == {"schema", "port", "login"}
    # The extra's example holds tuning keys only: nothing that would become an HTTP header.
    example = json.loads(behaviour["placeholders"]["extra"])
    assert set(example) <= TUNING_KEYS
