"""
### TikTok conversions through LiveRamp's ATS Conversions API adapter, by the hour

The same pipeline as `tiktok_conversions` (same tasks, same code), for **hourly partitions**
`dt=YYYY-MM-DDTHH` (UTC hour, e.g. `dt=2026-11-20T13`) under the Variable `capi_landing_root`:
an hour's conversions reach TikTok about an hour after they happened instead of a day.

| task | what differs from the daily DAG |
|---|---|
| `wait_for_partition` | waits for `dt=YYYY-MM-DDTHH/_SUCCESS`; fails after `capi_hourly_partition_wait_minutes` (90) |
| schedule | 15 minutes past each hour (UTC), for the hour before: the run of 14:15 takes `...T13` |
| deadline | `CAPI_HOURLY_PARTITION_DEADLINE_MINUTES` (opt-in, e.g. 60) |

Everything else (claim, extract, validate, send, recover_held, report, the dry run) is the daily
DAG's. **Sessions across an hour boundary**: each event belongs to the one hourly partition whose
files hold it, so it is sent by that hour's run only (never twice, never lost); a session that
spans two hours is two sessions, one per hour, each batched on its own (a batch still holds one
session).

**Rerun an hour**: clear the failed tasks (UI) or
`airflow dags clear tiktok_conversions_hourly --partition-key YYYY-MM-DDTHH`. **Manual run**:
trigger with the param `partition` set to `YYYY-MM-DDTHH`; **dry run**: the param `dry_run`.
"""

from __future__ import annotations

from liveramp_capi.dags_factory import build_conversions_dag

# One Airflow DAG per granularity, from one builder: see dags/tiktok_conversions.py.
dag = build_conversions_dag("tiktok_conversions_hourly", "hourly", __doc__)
