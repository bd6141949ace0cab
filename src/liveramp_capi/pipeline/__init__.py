"""The pipelines' steps as plain Python: a typed config in, a typed result out, no Airflow.

Settings and their typed sections live in :mod:`.config`. The operators under :mod:`liveramp_capi.operators` resolve the config and the connections, call
one step and push its (small) result to XCom; the steps can be run and tested without Airflow.

| step | module |
|---|---|
| claim, extract | :mod:`.claim`, :mod:`.extract` |
| validate a partition | :mod:`.validate` |
| send a shard (or plan it, in a dry run) | :mod:`.deliver` |
| report a partition | :mod:`.report` |
| recover held conversions | :mod:`.recover` |
| plan, refresh and report envelope refreshes | :mod:`.refresh` |
"""
