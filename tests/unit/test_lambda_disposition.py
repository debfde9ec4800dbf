"""A RequestResponse function's answer: only a known disposition stops, nothing fails."""

from __future__ import annotations

import pytest

from mxrules.actions.lambda_invoke import disposition_of


@pytest.mark.parametrize(("answer", "disposition"), [
    pytest.param(b'{"disposition": "STOP_RULE"}', "STOP_RULE", id="stop-rule"),
    pytest.param(b'{"disposition": "stop_rule_set"}', "STOP_RULE_SET", id="any-case"),
    pytest.param(b'{"disposition": "CONTINUE"}', "CONTINUE", id="continue"),
    pytest.param(b"", "CONTINUE", id="empty"),
    pytest.param(b"null", "CONTINUE", id="null"),
    pytest.param(b'"STOP_RULE"', "CONTINUE", id="bare-string"),
    pytest.param(b'{"disposition": ["STOP_RULE"]}', "CONTINUE", id="list-value"),
    pytest.param(b"\xff\xfe", "CONTINUE", id="not-utf8"),
    pytest.param(b'{"disposition": "STOP_RULE"', "CONTINUE", id="cut-short"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "CONTINUE", id="nested-past-recursion"),
    pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "CONTINUE", id="nested-objects"),
    pytest.param(b'{"disposition": "STOP_RULE", "x": ' + b"[" * 100_000 + b"]" * 100_000
                 + b"}", "CONTINUE", id="stop-beside-deep-nesting"),
    pytest.param(b'{"disposition": "\\ud800"}', "CONTINUE", id="lone-surrogate"),
])
def test_disposition_of_any_answer(answer: bytes, disposition: str) -> None:
    assert disposition_of(answer) == disposition
