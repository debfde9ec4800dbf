"""Which incoming verdict headers speak for this host, and so must not survive.

Consumers of a stored copy trust `Authentication-Results` that name this host
as authserv-id (RFC 8601 §5: only the host itself may write them) and the
`X-SES-*-Verdict` headers SES (here: mxrules) writes.  A copy of either that
arrived with the message was written by someone else and is removed from
Postfix's copy and kept out of the stored copy.

The authserv-id is read as RFC 8601 §2.2 defines it, not as a naive parser
would: the value may start with comments (nested, with quoted-pairs) and
folding whitespace, and the id itself is an RFC 2045 `value` -- a token or a
quoted-string -- compared without regard to case (it is a host name in
practice, and consumers compare it as one).  `(x) mx.example; spf=pass` and
`"mx.example"; dkim=pass` both claim mx.example.  Pure functions, linear in the
value's length, never raising.
"""

from __future__ import annotations

from collections.abc import Mapping

from .verdicts import DISABLED, SCANNED

AUTH_RESULTS = "Authentication-Results"
SPAM_VERDICT = "X-SES-Spam-Verdict"
VIRUS_VERDICT = "X-SES-Virus-Verdict"
# SES's other X-SES-* headers (X-SES-RECEIPT, X-SES-DKIM-SIGNATURE: SES signing its
# receipt) are not written by mxrules, which has no SES key; only these two are.
VERDICT_HEADERS = (SPAM_VERDICT, VIRUS_VERDICT)  # one per verdicts.SCANNED, in its order
# The headers only this host may write, by lower-case name (names compare
# without regard to case), spelled as mxrules writes them.
OWN_HEADERS = {h.lower(): h for h in (AUTH_RESULTS, *VERDICT_HEADERS)}

_WSP = b" \t\r\n"


def verdict_headers(statuses: Mapping[str, str]) -> list[tuple[str, str]]:
    """SES's spam and virus verdict headers, in SES's order, for the scans that ran.

    `statuses` maps "spam" and "virus" to a verdict status; a scan that did not run
    (DISABLED, or absent) has no header, as in SES.  The one place both the milter
    (Postfix's copy) and the payloads (the stored copy) take them from.
    """
    out = []
    for name, key in zip(VERDICT_HEADERS, SCANNED, strict=True):
        status = statuses.get(key, DISABLED)
        if status != DISABLED:
            out.append((name, status))
    return out
# RFC 2045 tspecials: what ends a token (besides space and controls).
_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?=')


def authserv_id(value: bytes) -> str | None:
    """The authserv-id an Authentication-Results value names, or None if it names none.

    Leading CFWS is skipped; a quoted-string is unquoted (quoted-pairs
    resolved); a token ends at whitespace, a control or a tspecial.  What
    follows the id is not judged: a value that names an id and is malformed
    after it is still read as naming that id by lenient parsers.  Bytes that
    are not UTF-8 are replaced (they can never match a host name).
    """
    i = _skip_cfws(value, 0)
    if i >= len(value):
        return None
    raw = _quoted_string(value, i) if value[i:i + 1] == b'"' else _token(value, i)
    if not raw:
        return None
    return raw.decode("utf-8", "replace")


def claims(value: bytes, host: str) -> bool:
    """Does this Authentication-Results value speak for `host`?

    Case-insensitive, and blind to one trailing dot (`mx.example.` is the
    same DNS name): whoever compares leniently must not be fooled either.
    """
    found = authserv_id(value)
    return found is not None and _norm(found) == _norm(host)


def forged(name: str, value: bytes, host: str) -> bool:
    """Is this incoming header one only `host` may write?"""
    own = OWN_HEADERS.get(name.strip().lower())
    return own in VERDICT_HEADERS or (own == AUTH_RESULTS and claims(value, host))


def _norm(host: str) -> str:
    host = host.strip().lower()
    return host[:-1] if host.endswith(".") else host


def _skip_cfws(data: bytes, i: int) -> int:
    """The index after any folding whitespace and comments starting at i.

    Comments nest (RFC 5322 §3.2.2) and may hold quoted-pairs; an unclosed
    comment runs to the end.  A depth counter, not recursion: a hostile
    value of 100,000 `(` costs one pass.
    """
    depth = 0
    n = len(data)
    while i < n:
        c = data[i]
        if depth:
            if c == 0x5C:  # backslash: the next byte is quoted
                i += 2
                continue
            depth += (c == 0x28) - (c == 0x29)
        elif c == 0x28:
            depth = 1
        elif c not in _WSP:
            return i
        i += 1
    return n


def _quoted_string(data: bytes, i: int) -> bytes:
    """The content of the quoted-string at i (a `"`), unquoted; b"" if it never closes."""
    out = bytearray()
    i += 1
    n = len(data)
    while i < n:
        c = data[i]
        if c == 0x22:
            return bytes(out)
        if c == 0x5C and i + 1 < n:
            out.append(data[i + 1])
            i += 2
            continue
        if c not in b"\r\n":  # folding: the line break goes, the whitespace stays
            out.append(c)
        i += 1
    return b""


def _token(data: bytes, i: int) -> bytes:
    start = i
    n = len(data)
    while i < n:
        c = data[i]
        if c <= 0x20 or c == 0x7F or c in _TSPECIALS:
            break
        i += 1
    return data[start:i]
