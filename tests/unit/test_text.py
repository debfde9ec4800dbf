"""The named rules for text from mail on one line, each as its callers use it.

One row per kind of character for every rule, so where two rules differ the table
shows it: the stored copy keeps all but CR and LF, a scanner request refuses C0 and
DEL, a DSN replaces C1 and lone surrogates too, Postfix's copy refuses C0 but TAB, the
authentication headers replace NEL and the Unicode line breaks (and lone surrogates
by "?"), and the terminal escapes more still.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mxrules.terminal import printable
from mxrules.text import (
    controls_marked,
    has_controls,
    has_header_controls,
    header_text,
    one_line,
    without_line_breaks,
)

ROWS = {
    "plain": "a b",
    "crlf": "a\r\nb",
    "tab": "a\tb",
    "nul": "a\x00b",
    "esc": "a\x1bb",
    "del": "a\x7fb",
    "c1": "a\x85b",
    "surrogate": "a\udcffb",
    "utf8": "café",
    "bidi": "a\u202eb",
    "spaces": "  a   b  ",
}

EXPECTED: dict[str, tuple[Callable[[str], object], dict[str, object]]] = {
    "without_line_breaks": (without_line_breaks, {
        "plain": "a b", "crlf": "a  b", "tab": "a\tb", "nul": "a\x00b", "esc": "a\x1bb",
        "del": "a\x7fb", "c1": "a\x85b", "surrogate": "a\udcffb", "utf8": "café",
        "bidi": "a\u202eb", "spaces": "  a   b  "}),
    "has_controls": (has_controls, {
        "plain": False, "crlf": True, "tab": True, "nul": True, "esc": True, "del": True,
        "c1": False, "surrogate": False, "utf8": False, "bidi": False, "spaces": False}),
    "one_line": (one_line, {
        "plain": "a b", "crlf": "a b", "tab": "a b", "nul": "a b", "esc": "a b",
        "del": "a b", "c1": "a b", "surrogate": "a b", "utf8": "café", "bidi": "a\u202eb",
        "spaces": "a b"}),
    "controls_marked": (controls_marked, {
        "plain": "a b", "crlf": "a??b", "tab": "a?b", "nul": "a?b", "esc": "a?b",
        "del": "a?b", "c1": "a?b", "surrogate": "a?b", "utf8": "café", "bidi": "a\u202eb",
        "spaces": "  a   b  "}),
    "has_header_controls": (has_header_controls, {
        "plain": False, "crlf": True, "tab": False, "nul": True, "esc": True, "del": True,
        "c1": False, "surrogate": False, "utf8": False, "bidi": False, "spaces": False}),
    "header_text": (lambda text: header_text(text, 200), {
        "plain": "a b", "crlf": "a b", "tab": "a b", "nul": "a b", "esc": "a b",
        "del": "a b", "c1": "a b", "surrogate": "a?b", "utf8": "café", "bidi": "a\u202eb",
        "spaces": "a b"}),
    "terminal": (printable, {
        "plain": "a b", "crlf": "a\\x0d\\x0ab", "tab": "a\\x09b", "nul": "a\\x00b",
        "esc": "a\\x1bb", "del": "a\\x7fb", "c1": "a\\x85b", "surrogate": "a\\udcffb",
        "utf8": "café", "bidi": "a\\u202eb", "spaces": "  a   b  "}),
}


@pytest.mark.parametrize(("rule", "row"), [
    pytest.param(rule, row, id=f"{rule}-{row}") for rule in EXPECTED for row in ROWS
])
def test_rule(rule: str, row: str) -> None:
    function, expected = EXPECTED[rule]
    assert function(ROWS[row]) == expected[row]


@pytest.mark.parametrize(("text", "limit", "expected"), [
    pytest.param("x" * 300, 200, "x" * 197 + "...", id="cut"),
    pytest.param("x" * 200, 200, "x" * 200, id="at-the-limit"),
    pytest.param("a\u2028b\u2029c", 200, "a b c", id="unicode-line-breaks"),
])
def test_header_text_length(text: str, limit: int, expected: str) -> None:
    assert header_text(text, limit) == expected
