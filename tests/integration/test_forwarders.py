from __future__ import annotations
import pytest
from harness.stack import Stack, message
from harness.smtp import Client
pytestmark = pytest.mark.postfix

def test_probe(make_stack) -> None:
    stack: Stack = make_stack("yaml", delivery="deliver")
    stack.postfix.extra = {**(stack.postfix.extra or {}), "smtpd_authorized_xforward_hosts": "127.0.0.0/8"}
    stack.postfix.reload()
    msg = message("a@sender.test", ["user@example.com"])
    with Client("127.0.0.1", stack.postfix.smtp_port) as c:
        print(c.ehlo("fwd.test"))
        print(c._smtp.docmd("XFORWARD", "ADDR=192.0.2.9 NAME=orig.test HELO=orig.helo PROTO=ESMTP"))
        print(c.mail("a@sender.test"), c.rcpt("user@example.com"), c.data(msg))
    [(jid, job)] = stack.jobs()
    print(job.client)
    stack.sink.wait_for(1)
    print("DELIVERED:\n" + stack.sink.messages[0].data.decode())
    print(stack.milter.log())
    assert 0
