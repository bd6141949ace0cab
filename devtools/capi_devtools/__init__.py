"""
Development tools: never part of the production package nor of the Airflow image.

- ``liveramp_standin`` / ``standin_gateway``: the local stand-in of LiveRamp's endpoints (and the
  forwarder that exposes it on the compose network); ``standin_fixture`` runs it for tests.
- ``s3_fixture``: an S3-compatible server (moto) on loopback, for tests and the bench.
- ``airflow_env``: the pytest plugin that gives each test session its own Airflow home.
- ``demo``, ``airflow_local``, ``console_demo``, ``sample_partition`` (+ ``sample/``): ``make demo``
  and ``make airflow``.
- ``bench`` and ``bench_*``: ``make bench``.

Installed editable (``make install``), so ``REPO`` is this repository's checkout.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
