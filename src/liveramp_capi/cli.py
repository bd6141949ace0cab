"""Command line tools of the pipeline: ``python -m liveramp_capi.cli <command>``.

``forget-identity --user-key K [--user-key K2 ...]`` deletes the envelope store rows and the
held conversions of these user keys (a data subject's erasure request). It reads the state database from the Airflow
connection ``capi_state_default`` (e.g. ``AIRFLOW_CONN_CAPI_STATE_DEFAULT``) and prints counts
only: never a key, an envelope or a connection detail.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _forget_identity(args: argparse.Namespace) -> int:
    from liveramp_capi.hooks.state import CapiStateHook
    from liveramp_capi.state.database import StateDatabaseUnavailable, check_reachable

    keys: list[str] = [key for key in args.user_key if key]
    if args.user_keys_file:
        with open(args.user_keys_file, encoding="utf-8") as stream:
            keys.extend(line.strip() for line in stream if line.strip())
    if not keys:
        print("no user key given", file=sys.stderr)
        return 2
    hook = CapiStateHook(capi_state_conn_id=args.conn_id)
    try:
        check_reachable(hook.get_engine())
    except StateDatabaseUnavailable as err:
        print(str(err), file=sys.stderr)
        return 1
    store = hook.get_envelope_store()
    deleted = store.forget(keys)
    held = hook.get_held_conversions().forget(keys)
    print(
        f"forget-identity: {len(set(keys))} user key(s) requested, {deleted} envelope store row(s) "
        f"and {held} held conversion(s) deleted"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the process exit code.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m liveramp_capi.cli", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    forget = commands.add_parser(
        "forget-identity", help="delete the stored envelope, consent and IP of user keys (erasure request)"
    )
    forget.add_argument("--user-key", action="append", default=[], help="a user key (repeatable)")
    forget.add_argument("--user-keys-file", help="a file with one user key per line")
    forget.add_argument("--conn-id", default="capi_state_default", help="the state database connection id")
    forget.set_defaults(handler=_forget_identity)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
