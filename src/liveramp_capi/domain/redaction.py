"""Error texts made safe to store and show: no identifier, no control character, bounded size."""

from __future__ import annotations

import re

#: The longest error text kept (the delivery ledger's ``error`` column).
MAX_ERROR_CHARS = 500

_UUID_RE = re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-+/=]{32,}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


def sanitize_error(message: str | None) -> str | None:
    """Make an error text safe and small enough for the ledger's ``error`` column.

    Callers should never pass identifiers; as a second line of defence anything shaped like
    a device id (UUID) or an envelope (a long base64url run) is redacted.

    :param message: an error description, or None.
    """
    if message is None:
        return None
    text = _UUID_RE.sub("<redacted>", message)
    text = _TOKEN_RE.sub("<redacted>", text)
    text = _CONTROL_RE.sub(" ", text).strip()
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text
