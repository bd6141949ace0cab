"""A real S3-compatible server for tests: ``moto`` in server mode, a subprocess on a free loopback port.

Authentication is switched on (moto's ``INITIAL_NO_AUTH_ACTION_COUNT``): the first calls create an
IAM user with an access key allowed to use S3, and every call after that must be signed with that
key, so a wrong secret is refused as it would be by AWS. Nothing is downloaded at run time.

    with running_s3() as s3:
        s3.create_bucket("capi-landing")
        s3.connection_json()  # an Airflow connection (AIRFLOW_CONN_...) for the server
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_REGION = "us-east-1"
# The calls made before authentication is enforced: create_user, put_user_policy, create_access_key.
_BOOTSTRAP_CALLS = 3
_ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class S3Server:
    """Handle on a running moto server.

    :ivar endpoint_url: e.g. ``http://127.0.0.1:40123``.
    :ivar access_key_id: the key moto accepts (created at start).
    :ivar secret_access_key: its secret.
    """

    process: subprocess.Popen[bytes]
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    log_path: str

    @property
    def conn_id(self) -> str:
        """A connection id of this server alone (Airflow caches a filesystem per connection id)."""
        return f"capi_s3_{self.endpoint_url.rsplit(':', 1)[1]}"

    def requests_log(self) -> str:
        """The server's access log so far (one line per request: method, path, status)."""
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def upload_folder(self, folder: Any, bucket: str, prefix: str, *, skip: tuple[str, ...] = ()) -> list[str]:
        """Upload the files of a local folder under ``prefix``; return their names."""
        names = [p.name for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip]
        for name in names:
            self.put(bucket, f"{prefix}/{name}", (folder / name).read_bytes())
        return names

    def client(self, *, secret: str | None = None) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=_REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=secret or self.secret_access_key,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def connection_json(self, *, secret: str | None = None) -> str:
        """An Airflow ``aws`` connection to this server, for ``AIRFLOW_CONN_<ID>``."""
        return json.dumps(
            {
                "conn_type": "aws",
                "login": self.access_key_id,
                "password": secret or self.secret_access_key,
                "extra": {"endpoint_url": self.endpoint_url, "region_name": _REGION},
            }
        )

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=body)

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(o["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for o in page.get("Contents", []))

    def rss_kib(self) -> int:
        """The server's resident memory (it holds every object in memory)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen[bytes], stderr_path: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(stderr_path, errors="replace") as log:
                raise RuntimeError(f"moto server exited with {process.returncode}: {log.read()[-2000:]}")
        try:
            _OPENER.open(url + "/moto-api/", timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not answer within 60 s")


def _bootstrap_key(endpoint_url: str) -> tuple[str, str]:
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=endpoint_url, region_name=_REGION, aws_access_key_id="bootstrap", aws_secret_access_key="x"  # noqa: S106 - moto's bootstrap user, loopback only
    )
    iam.create_user(UserName="capi")
    iam.put_user_policy(UserName="capi", PolicyName="s3", PolicyDocument=json.dumps(_ALLOW_S3))
    key = iam.create_access_key(UserName="capi")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@contextlib.contextmanager
def running_s3() -> Iterator[S3Server]:
    """Start ``python -m moto.server`` on 127.0.0.1 with authentication; stop it on exit."""
    port = _free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_BOOTSTRAP_CALLS), "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HTTP_PROXY", "http_proxy"):
        env.pop(name, None)
    with tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False) as log:
        stderr_path = log.name
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    try:
        _wait_until_up(endpoint_url, process, stderr_path)
        access_key_id, secret = _bootstrap_key(endpoint_url)
        yield S3Server(process, endpoint_url, access_key_id, secret, stderr_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.unlink(stderr_path)
