"""The consent captured with an ATS envelope, and the envelope lifetime it implies.

LiveRamp's envelopes live 30 days, 15 days for users in California ("Store the identity
envelope"). Nothing in a conversion record tells a Californian from another US visitor: the US
Privacy string (``ct=3``) is used US-wide, and a record may carry no consent at all. So the
**conservative rule** gives every envelope 15 days unless its consent *proves* a jurisdiction
where 30 days apply:

* a TCF v2 string (``ct=4``): the EU/EEA consent framework;
* a GPP string whose sections (``gpp_sid``) all name non-Californian jurisdictions: EU TCF v2
  (2), Canadian TCF (5), Virginia (9), Colorado (10), Utah (11), Connecticut (12). US-National
  (7) and the US Privacy section (6) cover California too, and an unknown section proves
  nothing, so any of those keeps the short lifetime.

``ct=3``, the legacy ``ct=1``, no consent or anything unrecognised: 15 days. An advertiser who
knows its traffic holds no Californians may choose :attr:`LifetimeRule.NO_CALIFORNIA_TRAFFIC`:
30 days unless a GPP string names California (section 8).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CALIFORNIA_GPP_SECTION",
    "CALIFORNIA_LIFETIME_DAYS",
    "DAY_SECONDS",
    "LIFETIME_DAYS",
    "NON_CALIFORNIA_GPP_SECTIONS",
    "TCF_V2_CONSENT_TYPE",
    "Consent",
    "LifetimeRule",
    "envelope_expiry",
    "gpp_sections",
    "lifetime_seconds",
]

LIFETIME_DAYS = 30
CALIFORNIA_LIFETIME_DAYS = 15
DAY_SECONDS = 86_400
#: GPP section id of the US-California section.
CALIFORNIA_GPP_SECTION = 8
#: GPP sections that name a jurisdiction other than California (IAB GPP "Section IDs" table).
NON_CALIFORNIA_GPP_SECTIONS: frozenset[int] = frozenset({2, 5, 9, 10, 11, 12})
#: ``ct`` of a TCF v2 consent string (EU/EEA).
TCF_V2_CONSENT_TYPE = 4


class LifetimeRule(enum.StrEnum):
    """How envelope lifetimes are decided (connection extra or Variable ``envelope_lifetime_rule``)."""

    #: 15 days unless the consent proves a jurisdiction where 30 days apply (the default).
    CONSERVATIVE = "conservative"
    #: 30 days unless a GPP string names California: for advertisers without Californian traffic.
    NO_CALIFORNIA_TRAFFIC = "no_california_traffic"

    @classmethod
    def parse(cls, value: Any) -> LifetimeRule:
        """Read a configured rule; empty means the default.

        :param value: a rule name (case and surrounding blanks ignored), or None.
        :raises ValueError: naming the accepted values, for anything else.
        """
        if value is None or (isinstance(value, str) and not value.strip()):
            return cls.CONSERVATIVE
        text = str(value).strip().lower()
        for rule in cls:
            if rule.value == text:
                return rule
        raise ValueError(
            f"envelope_lifetime_rule must be one of {', '.join(rule.value for rule in cls)} "
            f"(got a {len(text)}-character value that is neither)"
        )


def gpp_sections(gpp_sid: str | Sequence[int] | None) -> frozenset[int]:
    """Return the section ids of a ``gpp_sid`` value (``"7,8"``, ``"7_8"`` or ``[7, 8]``).

    :param gpp_sid: the value as found in a record, or None.
    """
    if gpp_sid is None:
        return frozenset()
    if isinstance(gpp_sid, str):
        parts = gpp_sid.replace("_", ",").split(",")
    else:
        parts = [str(part) for part in gpp_sid]
    return frozenset(int(part) for part in parts if part.strip().isdigit())


@dataclass(frozen=True, slots=True)
class Consent:
    """The consent captured with an envelope: TCF/USP (``ct`` + ``cv``) or GPP (``gpp`` + ``gpp_sid``).

    :param ct: consent type (1 TCF v1.1, 3 US Privacy, 4 TCF v2), with ``cv``.
    :param cv: the consent string (secret for logs).
    :param gpp: the GPP string (secret for logs), with ``gpp_sid``.
    :param gpp_sid: GPP section ids, normalised to ``"7,8"``.
    """

    ct: int | None = None
    cv: str | None = field(default=None, repr=False)
    gpp: str | None = field(default=None, repr=False)
    gpp_sid: str | None = None

    @classmethod
    def from_record(cls, value: Any) -> Consent | None:
        """Read a record's pipeline-only ``consent`` field; ``None`` when absent or incomplete.

        :param value: ``{"ct": 4, "cv": "..."}`` or ``{"gpp": "...", "gpp_sid": "7,8" | [7, 8]}``.
        """
        if not isinstance(value, Mapping):
            return None
        gpp, sid = value.get("gpp"), value.get("gpp_sid")
        if isinstance(gpp, str) and gpp and sid not in (None, "", []):
            sections = sorted(gpp_sections(sid))
            if sections:
                return cls(gpp=gpp, gpp_sid=",".join(str(s) for s in sections))
        ct, cv = value.get("ct"), value.get("cv")
        if isinstance(ct, int) and not isinstance(ct, bool) and isinstance(cv, str) and cv:
            return cls(ct=ct, cv=cv)
        return None

    @classmethod
    def from_columns(cls, ct: Any, cv: Any, gpp: Any, gpp_sid: Any) -> Consent | None:
        """Rebuild a stored consent (the envelope store's four consent columns)."""
        if gpp and gpp_sid:
            return cls(gpp=gpp, gpp_sid=gpp_sid)
        if ct is not None and cv:
            return cls(ct=int(ct), cv=cv)
        return None

    @property
    def is_gpp(self) -> bool:
        """Whether the GPP form (``gpp`` + ``gpp_sid``) is the one used."""
        return bool(self.gpp and self.gpp_sid)

    @property
    def is_california(self) -> bool:
        """Whether a GPP string names US-California (section 8): the user is Californian."""
        return self.is_gpp and CALIFORNIA_GPP_SECTION in gpp_sections(self.gpp_sid)

    @property
    def proves_outside_california(self) -> bool:
        """Whether the consent proves a jurisdiction other than California (30 days apply)."""
        if self.is_gpp:
            sections = gpp_sections(self.gpp_sid)
            return bool(sections) and sections <= NON_CALIFORNIA_GPP_SECTIONS
        return self.ct == TCF_V2_CONSENT_TYPE and bool(self.cv)

    def query(self) -> dict[str, str]:
        """The refresh API's consent parameters: ``gpp`` + ``gpp_sid`` when present, else ``ct`` + ``cv``."""
        if self.is_gpp:
            return {"gpp": str(self.gpp), "gpp_sid": str(self.gpp_sid)}
        if self.ct is not None and self.cv:
            return {"ct": str(self.ct), "cv": self.cv}
        return {}


def lifetime_seconds(consent: Consent | None, rule: LifetimeRule = LifetimeRule.CONSERVATIVE) -> int:
    """How long an envelope lives under ``rule``, given the consent captured with it.

    :param consent: the consent captured with the envelope, if any.
    :param rule: the configured lifetime rule.
    """
    if rule is LifetimeRule.NO_CALIFORNIA_TRAFFIC:
        long_lived = consent is None or not consent.is_california
    else:
        long_lived = consent is not None and consent.proves_outside_california
    return (LIFETIME_DAYS if long_lived else CALIFORNIA_LIFETIME_DAYS) * DAY_SECONDS


def envelope_expiry(
    issued_at: int, consent: Consent | None, rule: LifetimeRule = LifetimeRule.CONSERVATIVE
) -> int:
    """Unix time at which an envelope issued (or last refreshed) at ``issued_at`` expires.

    :param issued_at: Unix seconds of issue or last refresh.
    :param consent: the consent captured with it.
    :param rule: the configured lifetime rule.
    """
    return int(issued_at) + lifetime_seconds(consent, rule)


#: Refresh an envelope once at most this share of its own lifetime is left (a 15-day envelope
#: from day 10, a 30-day one from day 20); the settings table and the store's default both read it.
DEFAULT_REFRESH_REMAINING_SHARE = 1 / 3
