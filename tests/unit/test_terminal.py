"""What the CLI prints: control characters escaped, everything else as it is."""

from __future__ import annotations

import pytest

from mxrules.terminal import printable, printable_values


@pytest.mark.parametrize(("text", "keep", "shown"), [
    pytest.param("user@example.com", "", "user@example.com", id="plain"),
    pytest.param("störe ✓ 用户", "", "störe ✓ 用户", id="non-ascii-kept"),
    pytest.param('"a\x1b[2Jb"@example.com', "", '"a\\x1b[2Jb"@example.com', id="esc"),
    pytest.param("\x1b]0;title\x07", "", "\\x1b]0;title\\x07", id="osc-title"),
    pytest.param("a\x9b31mb", "", "a\\x9b31mb", id="c1-csi"),
    pytest.param("a\x00\x7f\tb", "", "a\\x00\\x7f\\x09b", id="nul-del-tab"),
    pytest.param("evil\u202egpj.exe", "", "evil\\u202egpj.exe", id="bidi-override"),
    pytest.param("a\u2028b\x85c", "", "a\\u2028b\\x85c", id="line-separators"),
    pytest.param("bad\udcff", "", "bad\\udcff", id="lone-surrogate"),
    pytest.param("one\ntwo\r\n", "", "one\\x0atwo\\x0d\\x0a", id="field-line-breaks"),
    pytest.param("one\ntwo\x1b\n", "\n", "one\ntwo\\x1b\n", id="output-keeps-its-lines"),
])
def test_printable(text: str, keep: str, shown: str) -> None:
    assert printable(text, keep=keep) == shown
    shown.encode("utf-8")  # a UTF-8 terminal can be sent it


def test_printable_values_escapes_every_string_of_a_structure() -> None:
    value = {"a\x1b": ["x\x1by", ("z\x07", 3)], "n": None, "ok": True}
    assert printable_values(value) == {"a\\x1b": ["x\\x1by", ("z\\x07", 3)], "n": None,
                                       "ok": True}
