"""Partition names and storage roots, checked before any path is built from them.

A partition is one calendar day, named ``YYYY-MM-DD``, or one hour of a day, named
``YYYY-MM-DDTHH`` (UTC, ``00``..``23``); its folder is ``dt=<name>`` either way, so a day's
folder and its hours' folders sit side by side under one root. Everything a run reads or writes is
derived from that name and two configured roots, so a name is checked strictly before any
path is built from it: nothing the user types can point a run outside its roots.
"""

from __future__ import annotations

import datetime as dt
import re
from urllib.parse import urlsplit

_PARTITION_RE = re.compile(r"\A\d{4}-\d{2}-\d{2}(T\d{2})?\Z", re.ASCII)

#: The two partition granularities and the ``strftime`` format of their names (the partition
#: timetable's ``key_format``).
DAILY = "daily"
HOURLY = "hourly"
KEY_FORMATS: dict[str, str] = {DAILY: "%Y-%m-%d", HOURLY: "%Y-%m-%dT%H"}

#: File name endings a partition may hold, longest first so ``.jsonl.gz`` wins over ``.gz``.
INPUT_SUFFIXES: tuple[str, ...] = (".jsonl.gz", ".csv.gz", ".jsonl", ".csv")

#: Storage schemes a root may use. ``file`` is the embedded default; the others work once the
#: matching fsspec package (s3fs, gcsfs, adlfs) is installed.
ALLOWED_ROOT_SCHEMES: frozenset[str] = frozenset({"file", "s3", "gs", "gcs", "abfs", "az", "memory"})


class InvalidPartition(ValueError):
    """A partition name that is not a real ``YYYY-MM-DD`` date or ``YYYY-MM-DDTHH`` hour."""


class InvalidRoot(ValueError):
    """A landing or output root that is not an absolute URL of an allowed storage scheme."""


def parse_partition(value: object) -> str:
    """Return ``value`` as a canonical partition name, or raise :class:`InvalidPartition`.

    :param value: what the user or the scheduler supplied (a param, a partition key).
    """
    text = "" if value is None else str(value).strip()
    if not _PARTITION_RE.match(text):
        # The value itself is echoed only as a length: it may be anything the user pasted.
        raise InvalidPartition(
            "partition must be a date written YYYY-MM-DD or an hour written YYYY-MM-DDTHH "
            f"(got a {len(text)}-character value that is neither)"
        )
    try:
        dt.date.fromisoformat(text[:10])
    except ValueError as err:
        raise InvalidPartition(f"partition {text[:10]} is not a calendar date: {err}") from None
    if partition_granularity(text) == HOURLY and int(text[11:]) > 23:
        raise InvalidPartition(f"partition of {text[:10]}: the hour must lie between 00 and 23")
    return text


#: The Variable that lets a day and its hours both be delivered (their files hold different
#: events); named here so the settings table and the refusal message share it.
MIXED_GRANULARITY_VARIABLE = "capi_allow_mixed_granularity"


def partition_granularity(name: str) -> str:
    """:data:`HOURLY` for an hour's name (``YYYY-MM-DDTHH``), else :data:`DAILY`."""
    return HOURLY if "T" in name else DAILY


def check_root(url: str, *, name: str) -> str:
    """Validate a storage root URL and return it without a trailing slash.

    :param url: e.g. ``file:///data/landing``, ``s3://bucket/capi`` or ``s3://aws_default@bucket/capi``
        (the part before ``@`` names the Airflow connection holding the credentials).
    :param name: the setting it came from, for the error message.
    """
    text = (url or "").strip()
    parts = urlsplit(text)
    if parts.scheme not in ALLOWED_ROOT_SCHEMES:
        raise InvalidRoot(
            f"{name} must be a URL with one of the schemes {sorted(ALLOWED_ROOT_SCHEMES)}, "
            f"e.g. file:///data/capi (got scheme {parts.scheme!r})"
        )
    if parts.scheme == "file" and not parts.path.startswith("/"):
        raise InvalidRoot(f"{name} must be an absolute file:// URL (file:///path)")
    segments = [s for s in parts.path.split("/") if s]
    if any(s in {".", ".."} for s in segments):
        raise InvalidRoot(f"{name} must not contain '.' or '..' path segments")
    if parts.query or parts.fragment:
        raise InvalidRoot(f"{name} must not carry a query string or fragment")
    if ":" in parts.netloc.rpartition("@")[0]:
        # Only a connection id may stand before the "@" (s3://aws_default@bucket/...): a secret
        # in a Variable would be shown in the UI, the logs and every error naming the root.
        raise InvalidRoot(
            f"{name} must not carry credentials: keep them in an Airflow connection and name it in the "
            "URL instead, e.g. s3://aws_default@bucket/prefix"
        )
    return text.rstrip("/")


def input_kind(file_name: str) -> str | None:
    """Return the matching entry of :data:`INPUT_SUFFIXES` for a file name, or ``None``."""
    lowered = file_name.lower()
    for suffix in INPUT_SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    return None
