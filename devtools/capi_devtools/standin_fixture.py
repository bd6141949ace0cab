"""Run ``liveramp_standin.py`` as a subprocess on a free loopback port, for tests.

Used by the ``standin`` fixture in ``conftest.py``; importable on its own for benchmarks::

    with running_standin("--latency-ms", "50") as standin:
        print(standin.url, standin.stats())
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STANDIN_SCRIPT = Path(__file__).resolve().with_name("liveramp_standin.py")
DEFAULT_CONFIG_ID = "cfg-test-7f3a9c2e51"
_READY = re.compile(r"liveramp-standin listening on (http://\S+)")

# Never route loopback control calls through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StandInProcess:
    """
    Handle on a running stand-in.

    :ivar url: base URL, e.g. ``http://127.0.0.1:40123`` (no trailing slash).
    :ivar config_id: the ATS configuration ID the stand-in accepts.
    """

    def __init__(self, process: subprocess.Popen[bytes], url: str, config_id: str, stderr_path: str) -> None:
        self.process = process
        self.url = url
        self.config_id = config_id
        self.stderr_path = stderr_path

    def _call(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 - the loopback stand-in's http URL
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with _OPENER.open(request, timeout=timeout) as response:
            return json.loads(response.read())

    def config(self, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` into the stand-in's fault configuration; return the full config."""
        return self._call("POST", "/_standin/config", changes)

    def received(self, fields: str | None = None) -> list[dict[str, Any]]:
        """Accepted batches, oldest first (``fields="event_id,user_data.partner_id"`` trims events)."""
        query = f"?fields={fields}" if fields else ""
        return self._call("GET", "/_standin/received" + query)["batches"]

    def received_event_ids(self) -> list[str]:
        """``event_id`` of every accepted event, duplicates included."""
        return [e["event_id"] for b in self.received(fields="event_id") for e in b["events"]]

    def stats(self) -> dict[str, Any]:
        """Counters: requests by status, batches, events, max_rps, max_in_flight, ..."""
        return self._call("GET", "/_standin/stats")

    def refresh_calls(self) -> list[dict[str, str]]:
        """Query parameters of every envelope refresh call."""
        return self._call("GET", "/_standin/refresh-calls")

    def reset(self) -> None:
        """Forget received batches and counters (the fault configuration stays)."""
        self._call("POST", "/_standin/reset", {})

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text(errors="replace")


def _wait_ready(process: subprocess.Popen[bytes], stderr_path: str, timeout: float) -> str:
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=0.1):
                chunk = process.stdout.read() or b""
                buffer += chunk
                match = _READY.search(buffer.decode(errors="replace"))
                if match:
                    return match.group(1)
                if not chunk and process.poll() is not None:
                    break
            elif process.poll() is not None:
                break
    stderr = Path(stderr_path).read_text(errors="replace")[-2000:]
    raise RuntimeError(f"stand-in did not become ready (exit code {process.poll()}): {stderr}")


@contextlib.contextmanager
def running_standin(
    *args: str, config_id: str = DEFAULT_CONFIG_ID, timeout: float = 30.0
) -> Iterator[StandInProcess]:
    """
    Start the stand-in on ``127.0.0.1`` with a free port, yield a handle, terminate it afterwards.

    :param args: extra command-line flags, e.g. ``"--latency-ms", "50"``.
    :param config_id: the configuration ID it accepts.
    :param timeout: seconds to wait for the ready line.
    """
    stderr_file = tempfile.NamedTemporaryFile(prefix="standin-", suffix=".log", delete=False)
    command = [
        sys.executable,
        str(STANDIN_SCRIPT),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--config-id",
        config_id,
        *args,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file, stdin=subprocess.DEVNULL)
    try:
        url = _wait_ready(process, stderr_file.name, timeout)
        yield StandInProcess(process, url, config_id, stderr_file.name)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        stderr_file.close()
        with contextlib.suppress(OSError):
            os.unlink(stderr_file.name)
