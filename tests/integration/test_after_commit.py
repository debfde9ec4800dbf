"""Nothing after the commit turns into a 4xx: real Postfix, real milter, a retrying client.

Once mxrules has stored a message, a 451 makes the client send it again, and
every attempt is stored: duplicates.  Each test sends one message the way a
client does (again after a 4xx, up to three times) and checks it was stored
once and answered 250 once.

A config whose AddHeader value held a NUL passed the check, and each message
of the rule then failed after the commit (pymilter cannot pass a NUL to
libmilter).  Such a config is now refused, at start and at reload, naming
file and line, and the config in force stays.  (A change to Postfix's copy
that fails after the commit all the same is logged and the message stays
accepted: tests/unit/test_adapter.py, since libmilter cannot be made to
fail on cue.)
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from harness.smtp import Raw
from harness.stack import Stack

pytestmark = pytest.mark.postfix

RULES = [{"name": "all", "enabled": True, "recipients": ["example.com"],
          "actions": [{"add_header": {"header_name": "X-All", "header_value": "yes"}}]}]


def _attempt(stack: Stack, rcpts: list[bytes], msg: bytes) -> int:
    raw = Raw(stack.postfix.smtp_port)
    try:
        for step in [b"EHLO client.test", b"MAIL FROM:<a@sender.test>"]:
            code, text = raw.cmd(step)
            assert code == 250, (step, code, text)
        codes = [raw.cmd(b"RCPT TO:" + r)[0] for r in rcpts]
        assert codes == [250] * len(rcpts), codes
        return raw.data(msg)[0]
    finally:
        raw.close()


def _send_like_a_client(stack: Stack, rcpts: list[bytes], attempts: int = 3) -> list[int]:
    """The final reply of each attempt: the client tries again after a 4xx only."""
    msg = (f"From: <a@sender.test>\r\nTo: <{rcpts[0].decode('latin-1').strip('<>')}>\r\n"
           f"Subject: once\r\nMessage-ID: <{uuid.uuid4().hex}@sender.test>\r\n\r\nHello.\r\n"
           ).encode("latin-1")
    codes: list[int] = []
    while len(codes) < attempts:
        codes.append(_attempt(stack, rcpts, msg))
        if not 400 <= codes[-1] < 500:
            break
    return codes


def test_header_value_that_would_fail_after_commit_is_refused_at_reload(
        make_stack: Any) -> None:
    stack: Stack = make_stack("yaml", rules=RULES)
    bad = [{**RULES[0], "actions": [
        {"add_header": {"header_name": "X-All", "header_value": "a\x00b"}}]}]
    mark = len(stack.milter.log())
    path = stack.rewrite_config(rules=bad)
    outcome = stack.milter.wait_for_log(r"config reloaded.*|reload rejected.*", after=mark)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1)
                if text.strip().startswith("header_value:"))

    assert _send_like_a_client(stack, [b"<user@example.com>"]) == [250]
    [(_, job)] = stack.jobs()
    # The config in force stayed (after SPF/DKIM/DMARC's headers: every message is checked).
    assert [n for n, _ in job.auth_headers] == ["Received-SPF", "Authentication-Results"]
    assert job.in_stream_headers == (*job.auth_headers, ("X-All", "yes"))
    assert outcome.group(0).startswith("reload rejected"), outcome.group(0)
    assert f"{path}:{line}" in stack.milter.log()[mark:]
