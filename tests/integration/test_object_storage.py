"""Landing and output on ``s3://``, end to end, against a real S3-compatible server on loopback.

The server is moto in server mode (``tests/s3_fixture.py``), started and stopped by each test,
with authentication on: the pipeline reaches it through ObjectStoragePath, the Amazon provider and
s3fs, with the credentials and endpoint of an Airflow connection named in the root URLs.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from capi_devtools.sample_partition import stage_sample_partition
from tests.support.conversions_run import (
    SAMPLE_REJECTED_COUNT,
    configure_pipeline,
    run_conversions,
    sample_valid_event_ids,
    yesterday,
)

LANDING_BUCKET, OUTPUT_BUCKET = "capi-landing", "capi-output"
LANDING_PREFIX, OUTPUT_PREFIX = "feeds/tiktok", "delivery/tiktok"


def _point_roots_at(monkeypatch: pytest.MonkeyPatch, s3, *, conn_id: str | None = None) -> None:
    conn_id = conn_id or s3.conn_id
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", s3.connection_json())
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_LANDING_ROOT", f"s3://{conn_id}@{LANDING_BUCKET}/{LANDING_PREFIX}")
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_OUTPUT_ROOT", f"s3://{conn_id}@{OUTPUT_BUCKET}/{OUTPUT_PREFIX}")


def _upload_marker_once_checked(s3, key: str, *, timeout: float = 120.0) -> threading.Thread:
    """Upload the marker as soon as the server has answered 404 to a check for it (the sensor waits)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any("_SUCCESS" in line and '" 404' in line for line in s3.requests_log().splitlines()):
                s3.put(LANDING_BUCKET, key, b"")
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.airflow
def test_a_partition_on_s3_is_waited_for_claimed_delivered_once_and_reported_on_s3(
    airflow_db, standin, s3, tmp_path, monkeypatch
):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    _point_roots_at(monkeypatch, s3)
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_PARTITION_POLL_SECONDS", "0.5")
    s3.create_bucket(LANDING_BUCKET)
    s3.create_bucket(OUTPUT_BUCKET)
    folder = stage_sample_partition(tmp_path / "staged", partition)
    landing = f"{LANDING_PREFIX}/dt={partition}"
    uploaded = s3.upload_folder(folder, LANDING_BUCKET, landing, skip=("_SUCCESS",))
    assert any(name.endswith(".gz") for name in uploaded)
    # The export is still running: the marker arrives only after the sensor has looked for it.
    marker = _upload_marker_once_checked(s3, f"{landing}/_SUCCESS")

    assert run_conversions(partition) == "success"
    marker.join(timeout=1)

    log = s3.requests_log()
    assert any("_SUCCESS" in line and '" 404' in line for line in log.splitlines()), "the sensor never waited"
    received = Counter(standin.received_event_ids())
    assert set(received) == sample_valid_event_ids()
    assert max(received.values()) == 1, "an event was delivered twice"
    output = f"{OUTPUT_PREFIX}/dt={partition}"
    summary = json.loads(s3.get(OUTPUT_BUCKET, f"{output}/summary.json"))
    assert summary["status"] == "complete" and all(summary["checks"].values()), summary
    assert summary["valid"] == len(sample_valid_event_ids())
    rejected = [json.loads(line) for line in s3.get(OUTPUT_BUCKET, f"{output}/rejected.jsonl").splitlines()]
    assert len(rejected) == SAMPLE_REJECTED_COUNT
    keys = s3.keys(OUTPUT_BUCKET, output + "/")
    # The run's own record stays in its work folder; no draft is left behind by publish.
    assert [k for k in keys if k.endswith("/summary.json") and "/_work/" in k]
    assert not [k for k in keys if "/publish/" in k], keys
    assert not s3.keys(LANDING_BUCKET, f"{landing}/_work"), "nothing is written under the landing root"


@pytest.mark.airflow
def test_a_rerun_on_s3_replaces_the_published_files_and_sends_nothing_again(
    airflow_db, standin, s3, tmp_path, monkeypatch
):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    _point_roots_at(monkeypatch, s3)
    s3.create_bucket(LANDING_BUCKET)
    s3.create_bucket(OUTPUT_BUCKET)
    s3.upload_folder(stage_sample_partition(tmp_path / "staged", partition), LANDING_BUCKET,
                     f"{LANDING_PREFIX}/dt={partition}")

    from liveramp_capi.console.summaries import OutputRoot

    assert run_conversions(partition) == "success"
    first = len(standin.received_event_ids())
    # The console reads the same root (one long-lived reader: what it lists must not go stale).
    console = OutputRoot(f"s3://{s3.conn_id}@{OUTPUT_BUCKET}/{OUTPUT_PREFIX}")
    assert console.partitions() == [partition]
    assert console.summary(partition)["delivered_this_run"] == first
    assert run_conversions(partition) == "success"
    assert len(standin.received_event_ids()) == first
    output = f"{OUTPUT_PREFIX}/dt={partition}"
    summary = json.loads(s3.get(OUTPUT_BUCKET, f"{output}/summary.json"))
    assert summary["status"] == "complete" and summary["delivered_this_run"] == 0, summary
    console.partitions()
    assert console.summary(partition)["delivered_this_run"] == 0
    assert len(s3.get(OUTPUT_BUCKET, f"{output}/rejected.jsonl").splitlines()) == SAMPLE_REJECTED_COUNT
    assert not [k for k in s3.keys(OUTPUT_BUCKET, output + "/") if "/publish/" in k]


# -- what a wrong setting looks like ------------------------------------------------------------


def _sensor(landing_root: str):
    from liveramp_capi.sensors import PartitionReadySensor

    return PartitionReadySensor(task_id="wait", partition="2026-11-20", landing_root=landing_root, max_wait_minutes="360")


def test_a_missing_landing_bucket_fails_the_wait_at_once_naming_the_variable(s3, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv(f"AIRFLOW_CONN_{s3.conn_id.upper()}", s3.connection_json())
    sensor = _sensor(f"s3://{s3.conn_id}@no-such-bucket/feeds")
    with pytest.raises(AirflowFailException) as failure:
        sensor.execute({})  # no TaskDeferred: nothing is waited for
    message = str(failure.value)
    assert "bucket 'no-such-bucket' does not exist" in message
    assert "Variable capi_landing_root" in message and "Nothing was waited for" in message


def test_wrong_credentials_fail_at_once_naming_the_connection_and_no_secret(s3, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    s3.create_bucket(LANDING_BUCKET)
    wrong_secret = "wrong-secret-" + s3.secret_access_key[::-1]
    conn_id = s3.conn_id + "_wrong"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", s3.connection_json(secret=wrong_secret))
    sensor = _sensor(f"s3://{conn_id}@{LANDING_BUCKET}/feeds")
    with pytest.raises(AirflowFailException) as failure:
        sensor.execute({})
    message = str(failure.value)
    assert f"refused connection {conn_id!r}" in message and "Variable capi_landing_root" in message
    for secret in (wrong_secret, s3.secret_access_key, s3.access_key_id):
        assert secret not in message


def test_an_undefined_connection_fails_at_once_instead_of_using_other_credentials(s3, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    s3.create_bucket(LANDING_BUCKET)
    with pytest.raises(AirflowFailException, match="names a connection that is not defined"):
        _sensor(f"s3://capi_s3_typo@{LANDING_BUCKET}/feeds").execute({})


def test_a_missing_output_bucket_fails_the_claim_before_anything_is_read(s3, tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from liveramp_capi.operators.config_errors import permanent_config_errors
    from liveramp_capi.storage import StorageUnreachable, check_root_reachable

    monkeypatch.setenv(f"AIRFLOW_CONN_{s3.conn_id.upper()}", s3.connection_json())
    s3.create_bucket(LANDING_BUCKET)
    check_root_reachable(f"s3://{s3.conn_id}@{LANDING_BUCKET}/an/empty/prefix", variable="capi_landing_root")
    with pytest.raises(StorageUnreachable, match=r"bucket 'capi-output' does not exist \(Variable capi_output_root"):
        check_root_reachable(f"s3://{s3.conn_id}@{OUTPUT_BUCKET}/x", variable="capi_output_root")
    # The claim task wraps the same check: a setting to fix fails without spending retries.
    with pytest.raises(AirflowFailException, match="capi_output_root"), permanent_config_errors():
        check_root_reachable(f"s3://{s3.conn_id}@{OUTPUT_BUCKET}/x", variable="capi_output_root")
    # A local output root is created on demand; a local landing root must exist.
    check_root_reachable(f"file://{tmp_path}/new-output", variable="capi_output_root", local_must_exist=False)
    with pytest.raises(StorageUnreachable, match="capi_landing_root"):
        check_root_reachable(f"file://{tmp_path}/typo", variable="capi_landing_root")


def test_credentials_in_a_root_url_are_refused_without_echoing_them() -> None:
    from liveramp_capi.domain.partition import InvalidRoot, check_root

    with pytest.raises(InvalidRoot, match="must not carry credentials") as refused:
        check_root("s3://AKIAEXAMPLE:s3cr3t-value@bucket/capi", name="capi_landing_root")
    assert "s3cr3t" not in str(refused.value) and "AKIAEXAMPLE" not in str(refused.value)
    assert check_root("s3://aws_default@bucket/capi/", name="capi_landing_root") == "s3://aws_default@bucket/capi"



# -- large files are streamed -------------------------------------------------------------------


def test_validate_streams_a_large_gzip_partition_on_s3_in_bounded_memory(tmp_path):
    """Validate's peak RSS on S3 grows with the partition no more than on local disk, plus less than the file.

    Two sizes (30,000 and 300,000 records, one gzip file each: 22 MiB of gzip, about 180 MiB of
    shard output at the big size), each validated in a fresh process with landing and output on the
    moto server, and the same on ``file://`` as the baseline measured in the same run. S3 may add
    its fixed buffers (three 8 MiB blocks), not files: with s3fs's default 50 MiB blocks the growth
    exceeded file://'s by about 110 MiB.
    """
    from capi_devtools.bench_object_storage import bench_rows

    rows = {row["figure"].split(",")[0].split(" 3")[0]: row for row in bench_rows(tmp_path, events=300_000)}
    growth = rows["s3: validate RSS growth"]
    assert growth["met"], growth
    sharded = rows["s3: every valid record of the big partition sharded"]
    assert sharded["value"] == sharded["baseline"] > 290_000, sharded
