"""The verdicts recorded for each message, named once.

SES's receipt carries five, in this order: spamVerdict, virusVerdict,
spfVerdict, dkimVerdict, dmarcVerdict (receiving-email-notifications-contents.md).
Spam and virus come from a content scanner (spamd or rspamd, clamd) and are
also written as X-SES-*-Verdict headers; SPF, DKIM and DMARC from the
authentication checks.  A job records each under its name here; the milter,
the payloads and the bounce rules read them by these names.
"""

from __future__ import annotations

SPAM = "spam"
VIRUS = "virus"
SPF = "spf"
DKIM = "dkim"
DMARC = "dmarc"

VERDICTS = (SPAM, VIRUS, SPF, DKIM, DMARC)  # SES's receipt order
SCANNED = (SPAM, VIRUS)  # from a content scanner; each has a scanner config section
DISABLED = "DISABLED"  # the status of a check that did not run


def payload_field(name: str) -> str:
    """The receipt field of a verdict: `spam` -> `spamVerdict`."""
    return f"{name}Verdict"


def all_disabled() -> dict[str, str]:
    """Every verdict as not run: a message's record before (or without) its checks."""
    return dict.fromkeys(VERDICTS, DISABLED)
