"""The partition lease: one run at a time owns a partition in the state database.

The ledger alone cannot stop two runs of one partition from sending the same batch at the same
moment (it learns of a batch only when it is marked in flight, and a second run that cut the same
batch a millisecond later sends it too). So a run *claims* its partition before it reads, writes
or sends anything, and every task of the run confirms the claim before it works:

* the owner is the Airflow run (``dag_id/run_id``), so all tasks and all task tries of one run
  share the claim, and a second run of the same partition is refused;
* the claim carries a heartbeat and an expiry: a run whose worker was killed stops renewing and
  its claim lapses, so the next run takes over (the ledger then re-sends only batches whose
  outcome is unknown);
* a claim is released when the run's report has run, and can be taken over at once from a run
  that Airflow says has ended (the caller asks Airflow; this module knows no Airflow).

Claims are conditional upserts (``INSERT ... ON CONFLICT DO UPDATE ... WHERE``), atomic on
SQLite and PostgreSQL alike. Times are the callers' clocks in Unix seconds: workers' clocks must
agree to well within the lease's time to live (minutes), which NTP gives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.state.database import SQLITE_BEGIN_IMMEDIATE, upsert_insert
from liveramp_capi.state.migrations import ensure_component_schema, metadata

lease_table = sa.Table(
    "capi_partition_lease", metadata,
    sa.Column("partition", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(500), nullable=False),
    sa.Column("holder", sa.String(250), nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("released", sa.Boolean, nullable=False, default=False),
)

SCHEMA_COMPONENT = "partition_lease"
SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class LeaseState:
    """Who holds a partition's claim, as read right after an attempt to take or renew it.

    :ivar partition: the partition.
    :ivar owner: the run that holds (or last held) the claim.
    :ivar holder: where its last heartbeat came from (task, try, host), for messages.
    :ivar heartbeat_at: Unix seconds of its last heartbeat.
    :ivar expires_at: Unix seconds when the claim lapses unless renewed.
    :ivar released: the owner let go of it (its report ran).
    :ivar acquired: the caller holds the claim now.
    """

    partition: str
    owner: str
    holder: str
    heartbeat_at: float
    expires_at: float
    released: bool
    acquired: bool

    def describe(self, now: float) -> str:
        """One line for a log or an error: who holds the claim and how fresh it is."""
        return (
            f"run {self.owner} ({self.holder}; last heartbeat {max(0.0, now - self.heartbeat_at):.0f} s ago, "
            f"lapses in {max(0.0, self.expires_at - now):.0f} s unless renewed)"
        )


class PartitionHeld(RuntimeError):
    """Another live run holds the partition's claim."""

    def __init__(self, state: LeaseState, now: float) -> None:
        super().__init__(f"partition {state.partition} is being delivered by {state.describe(now)}")
        self.state = state


class PartitionLease:
    """Take, renew and release partition claims in the state database.

    :param engine: a SQLite or PostgreSQL engine.
    :param ttl_seconds: how long a claim lives after its last heartbeat.
    :param clock: Unix seconds now (a parameter so tests can move time).
    """

    def __init__(self, engine: Engine, ttl_seconds: float = 600.0, clock: Callable[[], float] = time.time) -> None:
        if ttl_seconds <= 0:
            raise ValueError("the lease's time to live must be positive")
        self.engine = engine
        self.ttl_seconds = float(ttl_seconds)
        self.clock = clock
        self._insert = upsert_insert(engine)

    def ensure_schema(self) -> None:
        """Create the lease table if missing (idempotent, safe under concurrency)."""
        ensure_component_schema(self.engine, [lease_table], SCHEMA_COMPONENT, SCHEMA_VERSION)

    def _begin(self) -> Any:
        connection = self.engine.connect()
        if self.engine.dialect.name == "sqlite":
            # Take SQLite's write lock at BEGIN, so the upsert and the read-back are one step.
            connection.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
        return connection

    def acquire(self, partition: str, owner: str, holder: str, *, take_over_from: str | None = None) -> LeaseState:
        """Take or renew the claim for ``owner``; return who holds it afterwards.

        The claim is granted when nobody holds it, when ``owner`` holds it already (a renewal,
        also after a release or a lapse), when it has lapsed or was released, or when it is held
        by ``take_over_from`` (a run the caller knows has ended).

        :param partition: the partition.
        :param owner: the claiming run, ``dag_id/run_id``.
        :param holder: where the claim is taken from (task, try, host), for other runs' messages.
        :param take_over_from: an owner whose claim may be taken although it has not lapsed.
        """
        now = self.clock()
        table = lease_table
        statement = self._insert(table).values(
            partition=partition,
            owner=owner,
            holder=holder[:250],
            acquired_at=now,
            heartbeat_at=now,
            expires_at=now + self.ttl_seconds,
            released=False,
        )
        excluded = statement.excluded
        takeable = sa.or_(
            table.c.owner == excluded.owner,
            table.c.released.is_(True),
            table.c.expires_at <= excluded.heartbeat_at,
        )
        if take_over_from is not None:
            takeable = sa.or_(takeable, table.c.owner == take_over_from)
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.partition],
            set_={
                "owner": excluded.owner,
                "holder": excluded.holder,
                # A renewal keeps the time the run first took the claim.
                "acquired_at": sa.case(
                    (sa.and_(table.c.owner == excluded.owner, table.c.released.is_(False)), table.c.acquired_at),
                    else_=excluded.acquired_at,
                ),
                "heartbeat_at": excluded.heartbeat_at,
                "expires_at": excluded.expires_at,
                "released": False,
            },
            where=takeable,
        )
        with self._begin() as connection, connection.begin():
            connection.execute(statement)
            row = connection.execute(sa.select(table).where(table.c.partition == partition)).one()
        return _state(row, owner)

    def release(self, partition: str, owner: str) -> bool:
        """Let go of the claim if ``owner`` holds it; return whether it did.

        :param partition: the partition.
        :param owner: the releasing run.
        """
        table = lease_table
        now = self.clock()
        with self._begin() as connection, connection.begin():
            result = connection.execute(
                sa.update(table)
                .where(table.c.partition == partition, table.c.owner == owner)
                .values(released=True, expires_at=now, heartbeat_at=now)
            )
        return bool(result.rowcount)

    def read(self, partition: str) -> LeaseState | None:
        """Return the claim as stored (``acquired`` is always False), or None when never claimed."""
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(lease_table).where(lease_table.c.partition == partition)).first()
        return None if row is None else _state(row, None)


def _state(row: Any, owner: str | None) -> LeaseState:
    return LeaseState(
        partition=row.partition,
        owner=row.owner,
        holder=row.holder,
        heartbeat_at=float(row.heartbeat_at),
        expires_at=float(row.expires_at),
        released=bool(row.released),
        acquired=owner is not None and row.owner == owner and not row.released,
    )


class LeaseKeeper:
    """Renew a held claim from a background thread while a long task works.

    Use as a context manager around the work; check :meth:`ensure_held` before every step that
    must not happen without the claim (marking batches in flight, publishing output). A renewal
    that finds another owner marks the claim lost; a renewal that fails for a database error is
    retried at the next beat (the claim lives ``ttl`` seconds, renewals come every ``ttl/4``).

    :param lease: the lease store.
    :param partition: the partition.
    :param owner: the run holding the claim.
    :param holder: where the heartbeats come from.
    :param interval_seconds: seconds between two renewals (default: a quarter of the ttl).
    """

    def __init__(
        self,
        lease: PartitionLease,
        partition: str,
        owner: str,
        holder: str,
        interval_seconds: float | None = None,
    ) -> None:
        self.lease = lease
        self.partition = partition
        self.owner = owner
        self.holder = holder
        self.interval_seconds = interval_seconds or max(1.0, lease.ttl_seconds / 4)
        self.lost_to: LeaseState | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.partition}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                state = self.lease.acquire(self.partition, self.owner, self.holder)
            except sa.exc.SQLAlchemyError:
                continue
            if not state.acquired:
                self.lost_to = state
                return

    def ensure_held(self) -> None:
        """Raise :class:`PartitionHeld` when another run took the claim over."""
        if self.lost_to is not None:
            raise PartitionHeld(self.lost_to, self.lease.clock())
