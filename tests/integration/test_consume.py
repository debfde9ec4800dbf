"""`delivery: consume` through a real Postfix: a handled recipient leaves Postfix's copy.

Postfix records each recipient as the client wrote it in RCPT TO and removes
one at a milter's request only when the milter names it in that same form;
the address Postfix resolved (`{rcpt_addr}`: lower-case domain, no trailing
dot) names another.  Each case sends one handled recipient (or two) written
in an unusual but valid way, plus an unmanaged one: the handled ones must be
stored by mxrules and never delivered by Postfix, which delivers only the
unmanaged one.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.smtp import Raw
from harness.stack import Stack, message
from harness.waiting import wait_until

pytestmark = pytest.mark.postfix

RULES = [{"name": "support", "enabled": True, "recipients": ["example.com"],
          "actions": [{"add_header": {"header_name": "X-Support", "header_value": "yes"}}]}]
OTHER = b"friend@other.test"


def _send(stack: Stack, rcpts: list[bytes]) -> list[tuple[bytes, int, bytes]]:
    raw = Raw(stack.postfix.smtp_port)
    steps = [b"EHLO client.test", b"MAIL FROM:<a@sender.test>",
             *(b"RCPT TO:" + r for r in rcpts)]
    try:
        replies = [(step, *raw.cmd(step)) for step in steps]
        msg = message("a@sender.test", ["support@example.com", OTHER.decode()])
        replies.append((b"DATA", *raw.data(msg)))
        return replies
    finally:
        raw.close()


@pytest.mark.parametrize("handled", [
    pytest.param([b"<SUPPORT@EXAMPLE.COM>"], id="upper-case"),
    pytest.param([b"<Support+Tag@example.com>"], id="plus-tag"),
    pytest.param([b"<support@example.com.>"], id="trailing-dot"),
    pytest.param([b'<"Support Desk"@Example.com>'], id="quoted-local-part"),
    pytest.param([b'<"support"@example.com>'], id="needlessly-quoted"),
    pytest.param([b"<Support@EXAMPLE.COM>", b"<support@example.com>"],
                 id="twice-in-two-cases"),
    pytest.param([b"<@relay.test:support@example.com>"], id="source-route"),
    pytest.param([b"support@EXAMPLE.com"], id="no-angle-brackets"),
])
def test_consume_removes_the_recipient_as_the_client_wrote_it(make_stack: Any,
                                                              handled: list[bytes]) -> None:
    stack: Stack = make_stack("yaml", rules=RULES, delivery="consume")
    replies = _send(stack, [*handled, b"<" + OTHER + b">"])
    assert all(200 <= code < 400 for _, code, _ in replies), replies
    assert replies[-1][1] == 250, replies

    # mxrules stored the message for every handled recipient ...
    [(_, job)] = stack.jobs()
    assert len(job.recipients) == len(handled)
    assert [m.rule.name for m in job.rules] == ["support"]
    # ... and Postfix delivered its copy to the unmanaged recipient only.
    stack.sink.wait_for(1)
    wait_until(stack.postfix.queue_empty, "Postfix's queue to empty")
    assert [m.rcpt_tos for m in stack.sink.messages] == [(OTHER.decode(),)]
    assert stack.milter.problems() == [], stack.milter.log()
