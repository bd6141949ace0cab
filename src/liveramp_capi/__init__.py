"""LiveRamp ATS -> TikTok Conversions API pipeline, packaged as an Airflow provider.

The ``domain`` and ``delivery`` subpackages are plain Python (no Airflow import) so they can be
tested and benchmarked alone; ``hooks`` and ``operators`` are thin Airflow adapters around them.
"""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
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
            },
            {
                "hook-class-name": "liveramp_capi.hooks.state.CapiStateHook",
                "connection-type": "capi_state",
            },
        ],
    }
