"""Text from mail made safe for one line of what mxrules writes: the rules in one place.

Which characters are dangerous depends on where the text goes, so there are a few
named rules rather than one; each says where it is used and why it is not another:

- `without_line_breaks`: a header value in the stored copy (mxrules.payload).  Only CR
  and LF go, each becoming a space: they are what would start a header of its own.
  Anything else is the value as SES would store it (a TAB, UTF-8, even a NUL from a
  hostile AddHeader value is the sender's text, and S3 takes any bytes).
- `has_controls`: a value mxrules sends in a scanner's request header
  (mxrules.scan.spam).  C0 controls and DEL are refused, not cleaned, since a
  changed address would be a different scan.
- `one_line`: text mxrules writes itself into a 7-bit DSN or a log line from a
  peer's reply (actions.dsn, actions.bounce): `CONTROLS` become spaces and runs of
  whitespace one space.
- `controls_marked`: text shown to people in a DSN's human part (actions.dsn):
  `CONTROLS` become "?", UTF-8 kept, so a reader sees that something was there.
- `has_header_controls`: the milter's last check of a header it adds to Postfix's
  copy (milter.session).  A TAB may stay (it is whitespace in a header value);
  any other C0 control or DEL leaves the header out.
- `header_text`: what the authentication checks write into Received-SPF and
  Authentication-Results (mxrules.scan.auth) from DNS and the message: C0, DEL
  and the Unicode line breaks (NEL, LS, PS, which some readers split lines at)
  become spaces, lone surrogates "?", runs of spaces one, and the text is cut to
  a length with "...".  C1 other than NEL stays: it is UTF-8 text in the header.

The operator's terminal has its own, stricter rule (bidirectional controls too,
escaped rather than replaced): mxrules.terminal.printable.
"""

from __future__ import annotations

import re

__all__ = ["C0_DEL", "CONTROLS", "controls_marked", "has_controls", "has_header_controls",
           "header_text", "one_line", "without_line_breaks"]

# What ends or corrupts a protocol line: C0 controls (CR, LF, NUL...) and DEL.
C0_DEL = re.compile(r"[\x00-\x1f\x7f]")
# Not text at all in a message mxrules composes: C0, DEL, C1 and lone surrogates
# (what surrogateescape makes of undecodable bytes, which cannot be encoded).
CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_HEADER_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # C0 but TAB, and DEL
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def without_line_breaks(value: str) -> str:
    """`value` with every CR and LF a space: a stray one must never start a new header."""
    return value.replace("\r", " ").replace("\n", " ")


def has_controls(value: str) -> bool:
    """A C0 control or DEL in `value`: a CR or LF would start a header of its own."""
    return C0_DEL.search(value) is not None


def one_line(value: str) -> str:
    """`value` on one line: CONTROLS as spaces, runs of whitespace one space, no ends."""
    return " ".join(CONTROLS.sub(" ", value).split())


def controls_marked(value: str) -> str:
    """`value` with CONTROLS shown as `?`, UTF-8 kept."""
    return CONTROLS.sub("?", value)


def has_header_controls(value: str) -> bool:
    """A C0 control but TAB, or DEL, in a header value: Postfix cannot take it."""
    return _HEADER_CONTROLS.search(value) is not None


def header_text(text: str, limit: int) -> str:
    """One safe line of at most `limit` characters (see the module's notes)."""
    text = _LINE_BREAKS.sub(" ", text)
    # Undecodable bytes arrive as lone surrogates (surrogateescape); they cannot be
    # encoded when the header is written.
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = re.sub(r" {2,}", " ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
