"""What the SPF, DKIM and DMARC checks find, as plain values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mxrules.scan import Verdict

Policy = Literal["none", "quarantine", "reject"]
_POLICIES: tuple[Policy, ...] = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class AuthResult:
    spf: Verdict
    dkim: Verdict
    dmarc: Verdict
    dmarc_policy: Policy | None  # set when DMARC failed (see the module docstring)
    received_spf: str  # value of a Received-SPF: header
    authentication_results: str  # value of an Authentication-Results: header


SpfCode = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
DkimCode = Literal["pass", "fail", "neutral", "temperror", "permerror"]
DmarcCode = Literal["pass", "fail", "none", "temperror", "permerror"]


@dataclass(frozen=True)
class SpfResult:
    result: SpfCode
    identity: Literal["mailfrom", "helo"]
    sender: str  # the address checked: MAIL FROM, or postmaster@HELO for a null sender
    domain: str  # its domain: what DMARC aligns with
    problem: str = ""  # why, for temperror and permerror


@dataclass(frozen=True)
class DkimResult:
    """One DKIM-Signature's outcome."""

    result: DkimCode
    domain: str = ""  # d=
    selector: str = ""  # s=
    signature: str = ""  # b=, whitespace removed
    reason: str = ""  # why, when not pass
    checked: bool = True  # False: never verified (message over the size limit)


@dataclass(frozen=True)
class DmarcRecord:
    p: Policy
    sp: Policy
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"


@dataclass(frozen=True)
class DmarcResult:
    result: DmarcCode
    from_domain: str = ""
    record: DmarcRecord | None = None
    policy: Policy | None = None  # the policy that applies to from_domain (p= or sp=)
    reason: str = ""
