"""
### TikTok conversions through LiveRamp's ATS Conversions API adapter

One run per daily **partition** `dt=YYYY-MM-DD` of conversion files under the Variable
`capi_landing_root`. Each event carries an ATS identity envelope (`user_data.partner_id`)
instead of personal data.

| task | what it does |
|---|---|
| `wait_for_partition` | waits, in the triggerer (no worker slot held), for `dt=YYYY-MM-DD/_SUCCESS`, the marker the export writes last; fails after `capi_partition_wait_minutes` (360) with a clear message |
| `claim_partition` | claims the partition for this run in the state database (a lease with heartbeat and expiry); while another run of the same partition works, waits up to `capi_partition_claim_wait_minutes` (60), then fails naming that run |
| `extract` | lists the partition's `*.jsonl`, `*.jsonl.gz`, `*.csv`, `*.csv.gz` files into the run's manifest |
| `validate` | checks every record (JSON Schema, duplicate `event_id`, 28-day window); rejects go to `rejected.jsonl` with file, line, pointer and reason; valid events are spilled to session shards |
| `send` | one mapped task per shard: sessions -> batches -> LiveRamp, many requests in flight; the delivery ledger makes reruns send only what was not acknowledged; events whose every envelope expired are held (`envelope_expired.jsonl`) |
| `recover_held` | delivers, exactly once, conversions held by earlier partitions whose user key now has a live envelope (this partition may have brought it); held events past the attribution window become lost |
| `report` | runs whatever happened upstream; writes this run's `summary.json` (and `failed.jsonl`, `envelope_expired.jsonl`) under `capi_output_root`, releases the claim, and fails unless this run's partition is delivered |

Every task writes into the run's own work folder (`dt=.../_work/<run>/`); the partition's files
are moved into place only by the run that owns the partition, so two runs never mix output.


**Rerun a failed partition**: clear the failed tasks (UI) or
`airflow dags clear tiktok_conversions --partition-key YYYY-MM-DD`. **Manual run**: trigger
with the param `partition` set to `YYYY-MM-DD`.

**Dry run**: trigger with the param `dry_run` on. The run claims the partition, validates and
plans batches exactly as a real run, writes `dt=.../dry_run/plan.jsonl` (shard, batch id, event
count), `dry_run/rejected.jsonl` and `dry_run/summary.json` (`"dry_run": true`), sends nothing
and changes no ledger, envelope store or held-conversion row. Hourly partitions:
`tiktok_conversions_hourly`.

**Alerts**: a failed run calls `default_failure_notifier()` (log-only unless
`CAPI_FAILURE_NOTIFIER` names another notifier); a run not finished
`CAPI_PARTITION_DEADLINE_MINUTES` (opt-in, e.g. 360) after it was queued raises a deadline alert.
"""

from __future__ import annotations

from liveramp_capi.dags_factory import build_conversions_dag

# One Airflow DAG per granularity, from one builder: see dags/tiktok_conversions_hourly.py.
dag = build_conversions_dag("tiktok_conversions", "daily", __doc__)
