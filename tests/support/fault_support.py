"""Shared helpers of the fault, bad-input and security tests: a generated partition and ledger reads.

The generated partition is deterministic (seeded): ``users`` web and app users, each with a few
sessions of a few events on the partition's day, every event with a unique ``event_id``. Every
value that identifies a person (envelope, device ids, client IP, consent string) is drawn
fresh, so the security tests can search logs for each of them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import socket
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

WEB_EVENTS = ("ViewContent", "AddToCart", "InitiateCheckout", "AddPaymentInfo", "CompletePayment", "Search")
APP_EVENTS = ("LaunchAPP", "ViewContent", "AddToCart", "Checkout", "Purchase")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _envelope(rng: random.Random) -> str:
    raw = bytes(rng.getrandbits(8) for _ in range(96))
    return "Ag" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _device_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)).upper()


@dataclass
class GeneratedPartition:
    """What :func:`write_partition` wrote: ids and every identifier, for the assertions."""

    folder: Path
    event_ids: list[str] = field(default_factory=list)
    envelopes: set[str] = field(default_factory=set)
    device_ids: set[str] = field(default_factory=set)
    client_ips: set[str] = field(default_factory=set)
    consent_strings: set[str] = field(default_factory=set)
    sessions: int = 0

    def identifiers(self) -> set[str]:
        """Every personal value written into the partition's input."""
        return self.envelopes | self.device_ids | self.client_ips | self.consent_strings


def generate_events(partition: str, users: int, *, seed: int = 7, prefix: str = "gen") -> tuple[list[dict], GeneratedPartition]:
    """Build valid events of ``users`` users on the partition's day (not written anywhere)."""
    rng = random.Random(seed)
    day = dt.datetime.fromisoformat(partition).replace(tzinfo=dt.UTC)
    start = int(day.timestamp())
    info = GeneratedPartition(Path("."))
    events: list[dict] = []
    counter = 0
    for user in range(users):
        app = user % 4 == 3
        envelope = _envelope(rng)
        info.envelopes.add(envelope)
        ip = f"198.51.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        info.client_ips.add(ip)
        consent_string = "CP" + base64.urlsafe_b64encode(bytes(rng.getrandbits(8) for _ in range(30))).decode().rstrip("=")
        info.consent_strings.add(consent_string)
        user_data: dict[str, Any] = {"partner_id": envelope}
        if app:
            user_data["idfa"] = _device_id(rng)
            user_data["idfv"] = _device_id(rng)
            info.device_ids.update((user_data["idfa"], user_data["idfv"]))
        # Sessions two hours apart, events a few minutes apart: the 30-minute gap splits them.
        t = start + rng.randrange(0, 3600)
        for _session in range(rng.randint(1, 3)):
            info.sessions += 1
            for _ in range(rng.randint(2, 14)):
                counter += 1
                event_id = f"{prefix}-{counter:06d}"
                event: dict[str, Any] = {
                    "event_manager": ["tiktok"],
                    "event_id": event_id,
                    "event_type": rng.choice(APP_EVENTS if app else WEB_EVENTS),
                    "event_time": t,
                    "event_source_url": f"https://shop.example/p/{rng.randrange(1000)}",
                    "user_data": dict(user_data),
                    "custom_data": [
                        {"key": "currency", "value": "EUR"},
                        {"key": "value", "value": f"{rng.randrange(100, 99999) / 100:.2f}"},
                    ],
                    "user_key": f"uk-{user:05d}",
                    "client_ip": ip,
                    "consent": {"ct": 4, "cv": consent_string},
                }
                if app:
                    event["app_data"] = {"app_id": "com.example.shop", "app_name": "Shop", "app_version": "1.2.3"}
                events.append(event)
                info.event_ids.append(event_id)
                t += rng.randrange(30, 600)
            t += 7200
        if t >= start + 86_000:
            raise AssertionError("generated events spill past the partition's day")
    return events, info


def write_partition(landing: Path, partition: str, users: int, *, seed: int = 7, files: int = 2) -> GeneratedPartition:
    """Write :func:`generate_events` as ``files`` JSONL files under ``<landing>/dt=<partition>/``."""
    events, info = generate_events(partition, users, seed=seed)
    folder = landing / f"dt={partition}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        part = events[index::files]
        (folder / f"events-{index}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in part), encoding="utf-8")
    (folder / "_SUCCESS").write_text("")  # the export's completion marker, which the DAG waits for
    info.folder = folder
    return info


def ledger_rows(state_db: Path, partition: str) -> list[dict[str, Any]]:
    """The delivery ledger's rows of a partition, read with plain sqlite3."""
    with sqlite3.connect(state_db) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute(
            "SELECT batch_id, state, attempts, event_count, event_ids, http_status, error FROM capi_delivery_ledger "
            "WHERE partition = ?",
            (partition,),
        ).fetchall()
    return [{**dict(row), "event_ids": json.loads(row["event_ids"])} for row in rows]


def task_context(run_id: str = "manual__faults", try_number: int = 1) -> dict[str, Any]:
    """The slice of an Airflow context the project's operators read (``run_id``, the task instance).

    ``ti.get_dagrun_state`` answers "running": a run outside Airflow never counts as ended.
    """
    ti = SimpleNamespace(
        dag_id="tiktok_conversions",
        task_id="operator_under_test",
        map_index=-1,
        try_number=try_number,
        get_dagrun_state=lambda dag_id, run_id: "running",
    )
    return {"run_id": run_id, "ti": ti}


def run_dag_once(partition: str, dag_id: str = "tiktok_conversions", **conf: Any) -> str:
    """Run a DAG of ``dags/`` with ``dag.test()``, with Airflow task retries switched off.

    The DAGs retry a failed task after minutes (``retry_delay``); ``dag.test()`` would sit out
    that delay. Tests that expect a failure want the first try's outcome, so every task of the
    loaded DAG object gets ``retries = 0`` (the DAG file itself is untouched).
    """
    from airflow.dag_processing.dagbag import DagBag

    from capi_devtools import REPO

    bag = DagBag(dag_folder=str(REPO / "dags" / f"{dag_id}.py"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    for task in dag.tasks:
        task.retries = 0
    run_conf = {"partition": partition, **conf} if partition else conf
    return str(dag.test(run_conf=run_conf).state)
