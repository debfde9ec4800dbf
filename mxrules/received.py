"""Who a `Received:` header says its writer received the message from.

A trusted forwarder's own `Received:` header is the only word mxrules has on
the original client of a forwarded message (when the forwarder does not send
XCLIENT).  Its from clause mixes two kinds of text: what the writing MTA
knows (the peer's address, its reverse DNS name) and what the client said
(the HELO name, an RFC 1413 ident).  Only the first kind may give the
address; a HELO of `[192.0.2.7]` says nothing about who connected.

The forms are those the MTAs write, read at their sources:

- Postfix smtpd (smtpd.c): `from HELO (RDNS [IP])`, then a line break and
  `by ...`; RDNS is `unknown` without a verified name, IPv6 is
  `[IPv6:2001:db8::1]`.  The HELO is the client's, with space, parentheses,
  quotes, `@`, `;` and `\\` printed as `?`.
- Sendmail (cf/m4/cfhead.m4 `_REC_HDR_`, `$_` from getauthinfo()):
  `from HELO (RDNS [IP])`, `from HELO ([IP])`, `from HELO (ident@RDNS [IP])`,
  with ` (may be forged)` inside the parentheses, or `(from RDNS [IP])`
  when the client gave no HELO; a line break before `by`.
- Exim (host.c host_build_sender_fullhost, the default received_header_text):
  `from RDNS ([IP] helo=HELO)` or, with an ident, `from RDNS` + line break +
  `([IP] helo=HELO ident=ID)`; without a verified name
  `from [IP] (port=P helo=HELO ident=ID)` (each item optional).  IPv6 has
  no `IPv6:` prefix; `[IP]:port` when incoming ports are logged.
- Exchange 2007 and later: `from HELO (IP) by HOST (IP) with Microsoft SMTP
  Server ...`, folded wherever it likes; Exchange 2010 MAPI and IIS SMTPSVC
  (Exchange 2003): `from HOST ([IP]) by HOST ...`.

`FORMS` is the table.  A header is read every way the table allows, on two
unfoldings: a line break plus one space is first taken as a break Postfix's
SMTP client inserted in an over-long line (smtp_line_length_limit splits a
1,100-character HELO, or the address itself, that way), then as ordinary
folding white space (RFC 5322).  Every reading must name the same address:
a HELO or ident written to look like another MTA's from clause gives a
second reading with another address, and the header is then "ambiguous",
believed for nothing.  A header the table cannot read is "unparsable".

Work and memory are linear in the header's length, which Postfix's
header_size_limit (102400 bytes by default) bounds; the whole value is read,
never a prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .ipfilter import IPAddress, parse_ip

# A chain of the user's own relays deeper than this is not credible (Postfix's
# own hopcount_limit is 50).
MAX_RECEIVED = 20
# A real header reads at most a few ways (every form, twice); thousands of
# readings are a header built to make work, and name nobody for sure.
MAX_READINGS = 64


@dataclass(frozen=True)
class Hop:
    """The sending side of one Received header: who connected to the MTA that wrote it."""

    address: IPAddress
    helo: str = ""
    rdns: str = ""
    form: str = ""  # the FORMS entry that read it


@dataclass(frozen=True)
class Form:
    """One way an MTA writes its from clause.

    `anchored` forms must match at the start of the text; the others are
    looked for anywhere after a leading `from `, and the text between is the
    HELO.  Every pattern names the address `addr`, and may name `helo`,
    `rdns` and `ident`.
    """

    name: str
    writers: str
    pattern: re.Pattern[str]
    anchored: bool = True


_ADDR = r"(?P<addr>(?:IPv6:)?[0-9A-F:.]{2,45})"
_BARE_ADDR = r"(?P<addr>[0-9A-F]{0,4}[:.][0-9A-F:.]{1,44})"
_HOST = r"[^\s()\[\]@]{1,255}"
_IDENT = r"[^\s()@]{1,200}"
# `(RDNS [IP])`, `([IP])`, `(ident@RDNS [IP])`, each optionally `(... (may be forged))`.
_GROUP = (rf"\((?:(?P<ident>{_IDENT})@)?(?:(?P<rdns>{_HOST}) )?\[{_ADDR}\]"
          r"(?: \(may be forged\))?\)")
# What follows a from clause written on the same line as the rest.
_BY = r"(?=\s+by\s)"


def _form(name: str, writers: str, pattern: str, *, anchored: bool = True) -> Form:
    return Form(name, writers, re.compile(pattern, re.IGNORECASE | re.ASCII), anchored)


FORMS: tuple[Form, ...] = (
    _form("postfix", "Postfix smtpd; Sendmail: from HELO (RDNS [IP]), then a line break",
          rf"\Afrom (?P<helo>[^\n]*?) ?{_GROUP}(?=\n)"),
    _form("sendmail-no-helo", "Sendmail, no HELO given: (from RDNS [IP])",
          rf"\A\(from (?:(?P<ident>{_IDENT})@)?(?:(?P<rdns>{_HOST}) )?\[{_ADDR}\]"
          r"(?: \(may be forged\))?\)(?=\n)"),
    _form("exim", "Exim, verified name: from RDNS ([IP] helo=HELO ident=ID)",
          rf"\Afrom (?P<rdns>{_HOST})\s\(\[{_ADDR}\](?::\d{{1,5}})?"
          rf"(?: helo=(?P<helo>[^\s()]+))?(?: ident=(?P<ident>[^\s()]+))?\)(?=\n)"),
    _form("exim-no-rdns", "Exim, no verified name: from [IP] (port=P helo=HELO ident=ID)",
          rf"\Afrom \[{_ADDR}\](?: \((?:port=\d{{1,5}} ?)?(?:helo=(?P<helo>[^\s()]+) ?)?"
          r"(?:ident=(?P<ident>[^\s()]+))?\))?(?=\n)"),
    _form("exchange", "Exchange 2007 and later: from HELO (IP) by HOST (IP) with ...",
          rf"\({_BARE_ADDR}\){_BY}", anchored=False),
    _form("one-line", "Exchange MAPI, IIS SMTPSVC, or any of the above on one line: "
          "from HELO ([IP]) by HOST ...", rf"{_GROUP}{_BY}", anchored=False),
)

_FROM = re.compile(r"from ", re.IGNORECASE | re.ASCII)
_SPACE_FOLD = re.compile(r"\n ")
_FOLD = re.compile(r"\n[ \t]*")
_BLANKS = re.compile(r"[ \t\r\f\v]+")


def _unfoldings(value: bytes) -> list[str]:
    """The header value as lines, read both ways a line break plus a space can mean.

    Lines are kept (a from clause ends at a line break in the forms that have
    one); white space inside a line becomes one space.
    """
    text = value.decode("latin-1").replace("\r\n", "\n").strip(" \t\r\n")
    joined = _SPACE_FOLD.sub("", text)  # Postfix's smtp_line_length_limit break
    out: list[str] = []
    for variant in (joined, text):
        lines = _BLANKS.sub(" ", _FOLD.sub("\n", variant))
        if lines not in out:
            out.append(lines)
    return out


def _matches(text: str) -> Iterator[tuple[Form, re.Match[str]]]:
    for form in FORMS:
        if form.anchored:
            match = form.pattern.match(text)
            if match:
                yield form, match
        elif _FROM.match(text):
            for match in form.pattern.finditer(text, 5):
                yield form, match


def _hop(form: Form, m: re.Match[str], text: str, address: IPAddress) -> Hop:
    groups = m.groupdict()
    helo = groups.get("helo")
    if helo is None and not form.anchored:
        helo = text[5:m.start()]
    return Hop(address, (helo or "").strip(), groups.get("rdns") or "", form.name)


def read_received(value: bytes) -> tuple[Hop | None, str]:
    """The hop a Received value names, or None and why not ("unparsable", "ambiguous")."""
    found: Hop | None = None
    readings = 0
    for text in _unfoldings(value):
        for form, m in _matches(text):
            readings += 1
            if readings > MAX_READINGS:
                return None, "ambiguous"
            try:
                address = parse_ip(m.group("addr"))
            except ValueError:
                continue  # not an address: this reading names nobody
            if found is None:
                found = _hop(form, m, text, address)
            elif address != found.address:
                return None, "ambiguous"
    return (found, "") if found is not None else (None, "unparsable")


def parse_received(value: bytes) -> Hop | None:
    return read_received(value)[0]


class OriginalClient:
    """The walk down a forwarded message's Received headers, fed one at a time.

    The topmost header was written by the trusted forwarder, so the client it
    names is true.  A header below is only as good as its writer: it is read
    only while every hop above it named a relay of the user's (or the relay
    itself over loopback, e.g. a content filter re-injecting).  A header that
    cannot be read ends the walk: who wrote the next one is unknown.  Each
    header is read as it arrives and only the answer is kept.
    """

    def __init__(self, trusted: Callable[[IPAddress], bool]) -> None:
        self._trusted = trusted
        self._seen = 0
        self._done = False
        self.hop: Hop | None = None
        self.reason = ""

    def add(self, value: bytes) -> None:
        if self._done:
            return
        self._seen += 1
        hop, why = read_received(value)
        if hop is None:
            self._end(None, f"{why}-received")
        elif not (self._trusted(hop.address) or hop.address.is_loopback):
            self._end(hop, "")
        elif self._seen >= MAX_RECEIVED:
            self._end(None, "too-many-hops")

    def _end(self, hop: Hop | None, reason: str) -> None:
        self._done, self.hop, self.reason = True, hop, reason

    def result(self) -> tuple[Hop | None, str]:
        """The original client, or None and why it is unknown."""
        if self._done:
            return self.hop, self.reason
        return None, "only-trusted-hops" if self._seen else "no-received"


# Every reason `OriginalClient` can give: the values of a bounded metric label.
UNRESOLVED_REASONS = ("no-received", "unparsable-received", "ambiguous-received",
                      "too-many-hops", "only-trusted-hops")


def original_client(
    received: Iterable[bytes], trusted: Callable[[IPAddress], bool]
) -> tuple[Hop | None, str]:
    """`OriginalClient` over a list of Received values, topmost first."""
    walk = OriginalClient(trusted)
    for value in received:
        walk.add(value)
    return walk.result()
