"""Scanners: SPF, DKIM, DMARC, spam and virus verdicts.

SES's verdicts: docs/ses-compatibility.md, "Authentication and scans".

Each scanner takes the spooled message file and a deadline and returns a
`Verdict`; none raises for a scanner that is down, slow or refuses the
message: that is `PROCESSING_FAILED`, and the mail goes on (never silently
PASS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["PASS", "FAIL", "GRAY", "PROCESSING_FAILED", "DISABLED"]


@dataclass(frozen=True)
class Verdict:
    status: Status
    detail: str = ""  # for logs: a score, a signature name, an error
    score: float | None = None


DISABLED = Verdict("DISABLED")
