"""LiveRamp ATS -> TikTok Conversions API pipeline, packaged as an Airflow provider.

The ``domain`` and ``delivery`` subpackages are plain Python (no Airflow import) so they can be
tested and benchmarked alone; ``hooks`` and ``operators`` are thin Airflow adapters around them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def get_provider_info() -> dict[str, Any]:
    """Describe this package to Airflow's ProvidersManager (``apache_airflow_provider`` entry point).

    Registering the connection types here is what gives ``liveramp_capi``, ``liveramp_envelope``
    and ``capi_state`` their own forms in the Airflow UI; a hook under ``plugins/`` cannot.
    """
    return {
        "package-name": "liveramp-capi",
        "name": "LiveRamp ATS Conversions API",
        "description": "Deliver ATS-enveloped conversions to TikTok through LiveRamp's CAPI adapter.",
        "versions": [__version__],
        "connection-types": [
            {
                "hook-class-name": "liveramp_capi.hooks.capi.LiveRampCapiHook",
                "connection-type": "liveramp_capi",
                "hook-name": "LiveRamp ATS Conversions API",
                # Declared here, not by the hook's get_ui_field_behaviour() (deprecated in
                # Airflow 3.2), so the UI gets the form without importing the hook.
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"host": "Base URL", "password": "ATS configuration ID"},
                    "placeholders": {
                        "host": "https://capi.analytics.rlcdn.com",
                        "password": "Configuration ID from LiveRamp Console (ATS > Web > Admin > Placement Details)",
                        "extra": '{"concurrency": 64, "timeout_seconds": 10, "max_attempts": 6, '
                        '"max_batch_events": 50, "max_requests_per_second": 0}',
                    },
                },
            },
            {
                "hook-class-name": "liveramp_capi.hooks.envelope.LiveRampEnvelopeHook",
                "connection-type": "liveramp_envelope",
                "hook-name": "LiveRamp ATS envelope refresh",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login", "password"],
                    "relabeling": {"host": "Base URL"},
                    "placeholders": {
                        "host": "https://api.rlcdn.com",
                        "extra": '{"pid": "<ATS placement id>", "origin": "https://www.example.com", '
                        '"concurrency": 32, "timeout_seconds": 10, "max_requests_per_second": 50}',
                    },
                },
            },
            {
                "hook-class-name": "liveramp_capi.hooks.state.CapiStateHook",
                "connection-type": "capi_state",
                "hook-name": "CAPI pipeline state database",
                "ui-field-behaviour": {
                    "hidden-fields": [],
                    "relabeling": {"host": "Host or SQLite file path", "schema": "Database"},
                    "placeholders": {
                        "host": "/opt/airflow/state/capi_state.db or db.example.com",
                        "schema": "capi (PostgreSQL only)",
                        "port": "5432 (PostgreSQL only)",
                        "extra": '{"sqlalchemy_url": "postgresql+psycopg://user:pass@host/db", '
                        '"envelope_lifetime_rule": "conservative"} (both optional)',
                    },
                },
            },
        ],
    }
