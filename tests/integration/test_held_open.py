"""60 SMTP sessions held open in DATA, through a real Postfix and the real milter.

A client that opens DATA and then sends nothing more ties up an smtpd
process and a milter connection until Postfix's timeouts.  Sixty of them at
once must not stop anyone else's mail, must not leave anything half-stored,
and each must still end properly: those that finish are stored once, those
that drop the connection are forgotten.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.smtp import Raw
from harness.stack import Stack, message
from harness.waiting import wait_until

pytestmark = pytest.mark.postfix

HELD = 60


def _open_data(stack: Stack, n: int) -> Raw:
    raw = Raw(stack.postfix.smtp_port)
    for step in [b"EHLO client.test", b"MAIL FROM:<a@sender.test>",
                 b"RCPT TO:<user@example.com>"]:
        code, text = raw.cmd(step)
        assert code == 250, (n, step, code, text)
    code, text = raw.cmd(b"DATA")
    assert code == 354, (n, code, text)
    # Headers and the start of a body, then nothing: the session stays in DATA.
    raw.sock.sendall(message("a@sender.test", ["user@example.com"], subject=f"held {n}",
                             body="first line\r\n"))
    return raw


def _subject(stack: Stack, job_id: str) -> str:
    with open(stack.spool.message_path("incoming", job_id), "rb") as fh:
        head = fh.read().split(b"\r\n\r\n", 1)[0]
    [subject] = [line[len(b"Subject: "):] for line in head.split(b"\r\n")
                 if line.startswith(b"Subject: ")]
    return subject.decode()


def test_sessions_held_open_in_data_hold_up_nobody(make_stack: Any) -> None:
    stack: Stack = make_stack("yaml")
    held = [_open_data(stack, n) for n in range(HELD)]
    try:
        # Others' mail goes through meanwhile.
        r = stack.send(["user@example.com"])
        assert r.data is not None and r.data[0] == 250, r
        assert len(stack.jobs()) == 1
        # Half of the held sessions finish their message: each is stored once.
        for raw in held[: HELD // 2]:
            raw.sock.sendall(b"last line\r\n.\r\n")
            code, text = raw.reply()
            assert code == 250, (code, text)
    finally:
        # The other half drop the connection in the middle of DATA.
        for raw in held[HELD // 2:]:
            raw.sock.close()
        for raw in held[: HELD // 2]:
            raw.close()
    wait_until(lambda: stack.postfix.maillog().count("lost connection after DATA") >= HELD // 2,
               "Postfix to see the dropped sessions", timeout=60)
    subjects = sorted(_subject(stack, job_id) for job_id, _ in stack.jobs())
    assert subjects == sorted(["test", *(f"held {n}" for n in range(HELD // 2))])
    assert stack.spool.ids("tmp") == []
    # And the milter is still fine for the next message.
    again = stack.send(["user@example.com"])
    assert again.data is not None and again.data[0] == 250, again
    assert stack.milter.problems() == []
