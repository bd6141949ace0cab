"""Error texts made safe to store: identifiers redacted, size bounded."""

from __future__ import annotations

from liveramp_capi.domain.redaction import MAX_ERROR_CHARS, sanitize_error


def test_sanitize_error() -> None:
    assert sanitize_error(None) is None
    assert sanitize_error("timeout after 30 s") == "timeout after 30 s"
    assert len(sanitize_error("word " * 500) or "") == MAX_ERROR_CHARS


def test_identifiers_and_control_characters_are_redacted() -> None:
    device = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
    envelope = "AgNTagi_Y2T6eSlK9l3X7uJ11ib8QP2RXvpd2id5wnpjZBOvMGlVDhKsr2Mr"
    text = sanitize_error(f"refused {device}\nfor {envelope}\x00")
    assert text == "refused <redacted> for <redacted>"
