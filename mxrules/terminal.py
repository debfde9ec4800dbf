"""Text for an operator's terminal: control characters shown, never sent.

Much of what `mxrules` prints comes from mail: envelope addresses (Postfix
accepts ESC in a quoted local part), HELO names, header values, error texts.
Printed raw, an ESC sequence would be run by the operator's terminal (move the
cursor, rewrite what is on screen, set the window title, worse on some
terminals); a bidirectional override would show an address backwards.  Every
command's output goes through `printable`.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls and DEL, C1 controls, the Unicode line and paragraph separators,
# the bidirectional controls (ALM, LRM, RLM, LRE..RLO, LRI..PDI) and lone
# surrogates (undecodable bytes, which a UTF-8 terminal cannot be sent at all).
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
    "\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, keep: str = "") -> str:
    """`text` with every control character written as an escape (`\\x1b`, `\\u202e`).

    `keep` names characters to leave as they are: "\\n" for a whole multi-line
    output, whose line breaks are its own; a single field keeps none, so a line
    break in a value cannot start a line of its own.
    """
    if keep:
        return _CONTROL.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)
    return _CONTROL.sub(_escape, text)


def printable_values(value: Any) -> Any:
    """A JSON-like structure with `printable` applied to every string in it (keys too)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_values(k): printable_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(printable_values(v) for v in value)
    return value
