"""A send shard's planning in a forked child process: the planning never holds the send loop's GIL.

A send task is bound by its interpreter lock: the event loop sends, and every bit of Python
work beside it (planning sessions into batches, the ledger writer's Python side) is time the
loop waits. Planning is the largest part, about 15 % of the loop's own CPU time. A thread
(:class:`~liveramp_capi.pipeline.shard_planner.ShardPlanner` without a child) only moves that
wait around; a child process takes it off the lock altogether and runs on the other core.

The child is forked once the shard is read and its look-ups are done, so it starts with every
input in memory (copy-on-write: it copies only the pages it touches). It does nothing but plan
and write: no log, no database, no file but its pipe. Forking a process that has threads is
safe under those rules: another thread's lock (a logging handler's, a connection pool's) may be
copied locked, and the child never takes one. It leaves with :func:`os._exit` whatever happens,
so it never runs the parent's ``finally`` blocks, ``atexit`` handlers or connection finalisers.

Wire format on the pipe, one frame per message: a kind byte, the payload's length (8 bytes,
big-endian) and a pickle. ``G``: a group (its batches as plain tuples: a frozen slotted dataclass
unpickles four times slower than it builds). ``E``: the end. ``X``: the planning raised; the
payload is the exception. An end of file without ``E`` means the child died.

If the parent dies, the child's next write fails (the pipe has no reader) and it exits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, NoReturn

from liveramp_capi.domain.batches import Batch
from liveramp_capi.domain.sessions import Session

__all__ = ["PlannerProcess", "PlannerProcessDied", "can_fork"]

_HEAD = struct.Struct("!cQ")
_GROUP, _END, _ERROR = b"G", b"E", b"X"
#: The read side's buffer: one frame of a real group (256 batches, some 350 KB) in few reads.
_READ_BUFFER = 1 << 20


class PlannerProcessDied(RuntimeError):
    """The planner process ended before it had planned the whole shard."""


def can_fork() -> bool:
    """Whether this platform can run the planner in a forked child (POSIX)."""
    return hasattr(os, "fork")


class PlannerProcess:
    """Plan ``sessions`` in a forked child; read the groups back with :meth:`groups`.

    :param sessions: the shard's sessions, in send order (inherited by the child, not copied).
    :param plan_groups: turns the sessions into planned groups (:func:`.shard_planner.plan_groups`
        with the plan bound); runs in the child only.
    """

    def __init__(self, sessions: Sequence[Session], plan_groups: Callable[[Sequence[Session]], Iterator[Any]]) -> None:
        read_fd, write_fd = os.pipe()
        with warnings.catch_warnings():
            # Python 3.12+ warns on every fork of a process with threads; the child follows the
            # rules in this module's docstring, which is what the warning asks for.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(write_fd, sessions, plan_groups)
        os.close(write_fd)
        self.pid = pid
        self._stream: BinaryIO = os.fdopen(read_fd, "rb", buffering=_READ_BUFFER)
        self._status: int | None = None

    def groups(self) -> Iterator[tuple[list[Batch], list[Any], Counter[str], list[bytes]]]:
        """The planned groups in order, as ``(batches, holds, counts, expired_lines)``.

        :raises PlannerProcessDied: when the child ended without its end frame.
        :raises BaseException: what the planning raised in the child.
        """
        read = self._stream.read
        while True:
            head = read(_HEAD.size)
            if len(head) < _HEAD.size:
                raise self._died()
            kind, size = _HEAD.unpack(head)
            payload = read(size)
            if len(payload) < size:
                raise self._died()
            if kind == _END:
                return
            # Only this process's own forked child writes to the pipe.
            if kind == _ERROR:
                raise pickle.loads(payload)  # noqa: S301
            rows, holds, counts, expired_lines = pickle.loads(payload)  # noqa: S301
            yield [Batch(*row) for row in rows], holds, Counter(counts), expired_lines

    def kill(self) -> None:
        """End the child if it still runs (idempotent): the reader then meets the end of the pipe."""
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # harmless on a child that exited: it is not reaped yet
            except ProcessLookupError:
                pass

    def reap(self) -> None:
        """Wait for the child and close the pipe (idempotent). Call once nobody reads :meth:`groups`."""
        if self._status is None:
            self._status = os.waitpid(self.pid, 0)[1]
        self._stream.close()

    def _died(self) -> PlannerProcessDied:
        _, status = os.waitpid(self.pid, 0)
        self._status = status
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit status {os.waitstatus_to_exitcode(status)}"
        return PlannerProcessDied(f"the planner process ended ({how}) before it had planned the whole shard")


def _child(fd: int, sessions: Sequence[Session], plan_groups: Callable[[Sequence[Session]], Iterator[Any]]) -> NoReturn:
    code = 1
    try:
        # The parent's handlers (Airflow's task runner installs some) must not run here: a
        # signal simply ends the child, and the parent reports the missing end.
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(number, signal.SIG_DFL)
        dumps, protocol = pickle.dumps, pickle.HIGHEST_PROTOCOL
        for group in plan_groups(sessions):
            rows = [(b.batch_id, b.session_key_hash, b.event_ids, b.body) for b in group.batches]
            _write(fd, _GROUP, dumps((rows, group.holds, dict(group.counts), group.expired_lines), protocol))
        _write(fd, _END, b"")
        code = 0
    except BaseException as exc:  # handed to the parent, raised there
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            _write(fd, _ERROR, _pickled(exc))
    finally:
        os._exit(code)


def _pickled(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc.with_traceback(None))
    except Exception:  # an exception that does not pickle: its type is still worth telling
        return pickle.dumps(RuntimeError(f"the planning raised {type(exc).__name__}"))


def _write(fd: int, kind: bytes, payload: bytes) -> None:
    view = memoryview(_HEAD.pack(kind, len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]

