"""Wait until a partition is complete: its ``_SUCCESS`` marker is in the landing folder."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout

from liveramp_capi.pipeline.config import SETTINGS
from liveramp_capi.storage.layout import partition_folder
from liveramp_capi.triggers.partition import (
    DEFAULT_MARKER,
    PartitionMarkerTrigger,
    marker_exists,
    marker_url,
)


class PartitionReadySensor(BaseSensorOperator):
    """Succeed once ``<landing_root>/dt=YYYY-MM-DD/_SUCCESS`` exists; fail with a clear message after ``max_wait_minutes``.

    The upstream export writes the marker last, so its presence means every file of the
    partition is in place (a partition read while files still arrive would be sent twice in
    part, or not at all). The sensor checks once at start (the common case: the data is there)
    and otherwise defers to :class:`~liveramp_capi.triggers.PartitionMarkerTrigger`, which polls
    in the triggerer, so the wait holds no worker slot. With ``deferrable=False`` it pokes in a
    worker slot like a classic sensor (for deployments without a triggerer).

    :param partition: the partition, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH`` (templated).
    :param landing_root: URL of the landing root (templated).
    :param max_wait_minutes: how long to wait for the marker before failing (templated).
    :param poll_seconds: seconds between two checks (templated; overrides ``poke_interval``).
    :param marker: the marker's file name.
    :param deferrable: wait in the triggerer (default) instead of a worker slot.
    """

    template_fields: Sequence[str] = ("partition", "landing_root", "max_wait_minutes", "poll_seconds")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        partition: str,
        landing_root: str,
        max_wait_minutes: float | str = SETTINGS["partition_wait_minutes"].default,
        poll_seconds: float | str | None = None,
        marker: str = DEFAULT_MARKER,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", float(SETTINGS["partition_poll_seconds"].default))
        super().__init__(**kwargs)
        self.partition = partition
        self.landing_root = landing_root
        self.max_wait_minutes = max_wait_minutes
        self.poll_seconds = poll_seconds
        self.marker = marker
        self.deferrable = deferrable

    def _marker_url(self) -> str:
        try:
            return marker_url(self.landing_root, self.partition, self.marker)
        except ValueError as err:
            raise AirflowFailException(str(err)) from None

    def _wait_seconds(self) -> float:
        try:
            minutes = float(self.max_wait_minutes)
        except (TypeError, ValueError):
            raise AirflowFailException("max_wait_minutes must be a number of minutes") from None
        if minutes <= 0:
            raise AirflowFailException("max_wait_minutes must be positive")
        return minutes * 60

    def _apply_poll_seconds(self) -> None:
        if self.poll_seconds in (None, "", "None"):
            return
        try:
            seconds = float(self.poll_seconds)
        except (TypeError, ValueError):
            raise AirflowFailException("poll_seconds must be a number of seconds") from None
        if seconds <= 0:
            raise AirflowFailException("poll_seconds must be positive")
        self.poke_interval = seconds

    def _timeout_message(self) -> str:
        minutes = self._wait_seconds() / 60
        return (
            f"partition {self.partition} is not complete: no {self.marker} marker in {partition_folder(str(self.partition))}/ "
            f"under the landing root after waiting {minutes:g} minutes. The upstream export writes it last; "
            "check that export, then clear this task to wait again."
        )

    def poke(self, context: Any) -> bool:
        found = marker_exists(self._marker_url())
        self.log.info("Partition %s %s its %s marker", self.partition, "has" if found else "lacks", self.marker)
        return found

    def _check_root(self) -> None:
        # "Not arrived yet" is worth waiting for; a landing root that does not exist (or a bucket
        # whose credentials are refused) is a setting to fix, and waiting hours before saying
        # "no marker" would hide it.
        from airflow.sdk.exceptions import AirflowNotFoundException

        from liveramp_capi.storage import StorageUnreachable, check_root_reachable

        self._marker_url()
        try:
            check_root_reachable(self.landing_root, variable="capi_landing_root")
        except StorageUnreachable as err:
            raise AirflowFailException(
                f"the landing root cannot be read: {err}; then clear this task. Nothing was waited for."
            ) from None
        except AirflowNotFoundException as err:
            raise AirflowFailException(
                f"the landing root (Variable capi_landing_root) names a connection that is not defined: {err}. "
                "Create it in Admin > Connections, then clear this task. Nothing was waited for."
            ) from None

    def execute(self, context: Any) -> None:
        wait = self._wait_seconds()
        self._apply_poll_seconds()
        self._check_root()
        if not self.deferrable:
            self.timeout = wait
            try:
                super().execute(context)
            except AirflowSensorTimeout:
                raise AirflowSensorTimeout(self._timeout_message()) from None
            return
        if self.poke(context):
            return
        # The trigger owns the clock; the deferral timeout is a backstop a little later, so
        # the clear message of the trigger's own timeout event is what the user normally sees.
        self.defer(
            trigger=PartitionMarkerTrigger(
                landing_root=self.landing_root,
                partition=self.partition,
                timeout_at=time.time() + wait,
                poll_interval=float(self.poke_interval),
                marker=self.marker,
            ),
            method_name="execute_complete",
            timeout=wait + max(120.0, float(self.poke_interval) * 2),
        )

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> None:
        """Resume after the trigger fired: succeed when the marker was found, fail on a timeout.

        :param event: the trigger's payload, ``{"status": "ready" | "timeout", ...}``.
        """
        status = (event or {}).get("status")
        if status == "ready":
            self.log.info("Partition %s is complete (%s found)", self.partition, self.marker)
            return
        raise AirflowSensorTimeout(self._timeout_message())
