"""End of data as one value: the reply and the ordered changes to Postfix's copy.

Pure: no I/O, no pymilter.  The milter decides a message's `Outcome` here and
the adapter (milter/adapter.py) only encodes each `Manipulation`, in the order
given, as the libmilter call it names.  The order is the rule that keeps the
changes right, so it is decided once, here:

- forged headers are removed first, per name the highest occurrence first:
  Postfix (cleanup_milter.c) counts an occurrence among the headers present
  when the request arrives, so a deletion renumbers those below it, and a
  header inserted before would shift the count onto mxrules' own;
- mxrules' headers are then inserted below Postfix's own Received: header
  (index 0), in the order given;
- then the handled recipients are deleted, as Postfix recorded them;
- a discard, when no recipient is left for Postfix, comes last.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from mxrules import authres
from mxrules.decision import CONTINUE, RcptDecision, Reply


@dataclass(frozen=True)
class RemoveHeader:
    """Delete the `occurrence`-th (1-based) header called `name`, whatever its case."""

    name: str
    occurrence: int
    step: ClassVar[str] = "remove-header"


@dataclass(frozen=True)
class InsertHeader:
    """Insert `name: value` at position `index` among the headers."""

    name: str
    value: str
    index: int
    step: ClassVar[str] = "add-header"


@dataclass(frozen=True)
class DeleteRecipient:
    """Remove a recipient from Postfix's copy, named as Postfix recorded it."""

    recipient: str
    step: ClassVar[str] = "remove-recipient"


@dataclass(frozen=True)
class Discard:
    """Postfix's copy goes nowhere: every recipient was handled (delivery: consume)."""

    step: ClassVar[str] = "discard"


Manipulation = RemoveHeader | InsertHeader | DeleteRecipient | Discard


@dataclass(frozen=True)
class Outcome:
    """What end of data answers: a reply and, for a stored message, its changes."""

    reply: Reply
    message_id: str = ""
    manipulations: tuple[Manipulation, ...] = ()

    @property
    def discard(self) -> bool:
        return any(isinstance(m, Discard) for m in self.manipulations)

    @property
    def add_headers(self) -> tuple[tuple[str, str], ...]:
        return tuple((m.name, m.value) for m in self.manipulations
                     if isinstance(m, InsertHeader))

    @property
    def remove_headers(self) -> tuple[tuple[str, int], ...]:
        return tuple((m.name, m.occurrence) for m in self.manipulations
                     if isinstance(m, RemoveHeader))

    @property
    def delete_recipients(self) -> tuple[str, ...]:
        return tuple(m.recipient for m in self.manipulations
                     if isinstance(m, DeleteRecipient))


@dataclass
class OwnHeaders:
    """The headers only this host may write, fed one by one as they arrive.

    Only this host may speak as its authserv-id (RFC 8601 section 5) or write
    SES's verdict headers: a copy that arrived from outside is kept out of the
    stored copy and deleted from Postfix's, whatever the rules scan.  Postfix
    finds a header to delete by name (without regard to case) and occurrence,
    so every occurrence of those names is counted, forged or not.
    """

    hostname: str
    seen: dict[str, int] = field(default_factory=dict)
    forged: list[tuple[str, int]] = field(default_factory=list)

    def header(self, name: str, value: bytes) -> bool:
        """Count `name: value`; True (and remembered for deletion) if it is forged."""
        own = authres.OWN_HEADERS.get(name.strip().lower())
        if own is None:
            return False
        self.seen[own] = occurrence = self.seen.get(own, 0) + 1
        if not authres.forged(name, value, self.hostname):
            return False
        self.forged.append((own, occurrence))
        return True


def stored(message_id: str, *, forged: Iterable[tuple[str, int]],
           headers: Sequence[tuple[str, str]], delete: Sequence[str],
           discard: bool) -> Outcome:
    """The outcome of a stored message: CONTINUE and its changes, in their one order."""
    changes: list[Manipulation] = [
        RemoveHeader(name, n) for name, n in sorted(forged, key=lambda f: (f[0], -f[1]))]
    changes += [InsertHeader(name, value, index)
                for index, (name, value) in enumerate(headers, start=1)]
    changes += [DeleteRecipient(r) for r in delete]
    if discard:
        changes.append(Discard())
    return Outcome(CONTINUE, message_id, tuple(changes))


def recipients_to_remove(decisions: Sequence[RcptDecision], recorded: Sequence[str],
                         consume: bool) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(recipients to delete, those that cannot be named, discard the copy?).

    consume: with no recipient left for Postfix its copy is discarded;
    otherwise each handled recipient is removed as Postfix recorded it.
    pymilter passes a recipient to libmilter as UTF-8 only: one whose bytes
    are not (SMTPUTF8 off in Postfix) cannot be named, and stays.
    """
    others = any(d.outcome == "unmanaged" for d in decisions)
    delete: list[str] = []
    kept: list[str] = []
    if consume and others:
        for decision, form in zip(decisions, recorded, strict=True):
            if decision.handled and form not in delete and form not in kept:
                (delete if passable(form) else kept).append(form)
    return tuple(delete), tuple(kept), consume and not others


def passable(text: str) -> bool:
    """Can pymilter hand `text` to libmilter (a C string, encoded as UTF-8)?"""
    return "\0" not in text and not SURROGATE.search(text)


# Lone surrogates: bytes pymilter decoded with surrogateescape that were not UTF-8.
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Ending:
    """How a message that ends without being stored is counted: one row per exit.

    `result` is mxrules_messages_total's label; `rejection` the reason of a
    data-stage mxrules_rejections_total ("" for none); `spool_failure` and
    `slot_timeout` count mxrules_spool_failures_total and
    mxrules_scan_slot_timeouts_total.  `level` is the log line's severity.
    """

    result: str
    level: int
    rejection: str = ""
    spool_failure: bool = False
    slot_timeout: bool = False


# Every exit of end of data but the stored one, as data (logging's levels, by value).
_INFO, _WARNING, _ERROR = 20, 30, 40
ENDINGS: dict[str, Ending] = {
    "no-managed-recipient": Ending("passed", _INFO),
    "internal-error": Ending("tempfail", _WARNING),
    "spool-failed": Ending("tempfail", _WARNING, spool_failure=True),
    "spool-unwritable": Ending("tempfail", _ERROR, spool_failure=True),
    "too-big": Ending("rejected", _INFO, rejection="size"),
    "too-big-for-actions": Ending("rejected", _INFO, rejection="too-big"),
    "scan-slots-busy": Ending("tempfail", _WARNING, slot_timeout=True),
    "scan-failed": Ending("tempfail", _WARNING),
    "unresolved-reject": Ending("rejected", _WARNING, rejection="unresolved-client"),
    "unresolved-tempfail": Ending("tempfail", _WARNING),
}


def blocked(reason: str) -> Ending:
    """A forwarded message whose original client the IP filters refuse, for `reason`."""
    return Ending("rejected", _INFO, rejection=reason)
