"""Trusted forwarders against a real Postfix (SPEC §3).

The test client connects from 127.0.0.1, made a trusted forwarder here: it
plays one of the user's own relays, whose own `Received:` header (the topmost
one in the message it sends) names the original client.
"""

from __future__ import annotations

import email
from email import policy
from typing import Any

import pytest

from harness.stack import Stack, message

pytestmark = pytest.mark.postfix

FORWARDER = "127.0.0.1"


def code(reply: tuple[int, Any] | None) -> int | None:
    return None if reply is None else reply[0]


def forwarded(original: str | None, rcpts: list[str], *, subject: str = "test") -> bytes:
    """A message as a Postfix relay of the user's passes it on: its own Received on top."""
    msg = message("a@sender.test", rcpts, subject=subject)
    if original is None:
        return msg
    received = (f"Received: from helo.sender.test (mail.sender.test [{original}])\r\n"
                "\tby relay.example.com (Postfix) with ESMTPS id 4QxAbc1\r\n"
                f"\tfor <{rcpts[0]}>; Sat, 28 Nov 2026 09:59:59 +0000 (UTC)\r\n")
    return received.encode() + msg


def test_postfix_does_not_pass_its_own_received_header_to_the_milter(make_stack: Any) -> None:
    """The first Received the milter sees is the client's, not the one Postfix adds."""
    stack: Stack = make_stack("yaml", delivery="deliver")
    r = stack.send(["user@example.com"], forwarded("192.0.2.7", ["user@example.com"]))
    assert code(r.data) == 250
    [(job_id, _)] = stack.jobs()
    with open(stack.spool.message_path("incoming", job_id), "rb") as fh:
        seen = fh.read()  # every header the milter's header callback was given, in order
    assert seen.startswith(b"Received: from helo.sender.test (mail.sender.test [192.0.2.7])")
    assert seen.count(b"Received:") == 1
    # Yet Postfix did add its own, above, in the copy it delivers.
    stack.sink.wait_for(1)
    delivered = email.message_from_bytes(stack.sink.messages[0].data, policy=policy.compat32)
    received = delivered.get_all("Received")
    assert len(received) == 2
    assert received[0].startswith("from client.test (localhost [127.0.0.1])")
    assert "by mx.test (Postfix)" in received[0]


def test_forwarded_mail_is_judged_by_the_original_client(make_stack: Any,
                                                        rules_source: str) -> None:
    stack: Stack = make_stack(rules_source, trusted_forwarders=[f"{FORWARDER}/32"])
    rcpts = ["user@example.com"]
    outcomes = {ip: stack.send(rcpts, forwarded(ip, rcpts, subject=ip))
                for ip in ("192.0.2.9", "198.51.100.20", "IPv6:2001:db8:bad::1",
                           "192.0.2.7", "203.0.113.5")}
    for blocked, why in (("192.0.2.9", "blocked by IP address filter"),
                         ("198.51.100.20", "blocked using local blocklist"),
                         ("IPv6:2001:db8:bad::1", "blocked by IP address filter")):
        r = outcomes[blocked]
        # The forwarder itself is accepted: the refusal comes at the end of DATA.
        assert code(r.mail) == 250 and code(r.rcpts["user@example.com"]) == 250, r
        assert code(r.data) == 554, (blocked, r)
        address = blocked.removeprefix("IPv6:")
        assert r.data is not None and f"5.7.1 Client host [{address}] {why}" in r.data[1]
    for allowed in ("192.0.2.7", "203.0.113.5"):  # 192.0.2.7: its Allow filter wins
        assert code(outcomes[allowed].data) == 250, (allowed, outcomes[allowed])

    # No Received header to go by: never judged as the forwarder, tempfailed.
    r = stack.send(rcpts, forwarded(None, rcpts, subject="local"))
    assert r.data is not None and r.data[0] == 451, r
    assert "4.7.1 Original client of forwarded message unknown" in r.data[1]

    jobs = sorted(((j.client.address, j.client.forwarded_by) for _, j in stack.jobs()))
    assert jobs == [("192.0.2.7", "127.0.0.1"), ("203.0.113.5", "127.0.0.1")]
    log = stack.milter.log()
    assert "client=192.0.2.9 forwarded_by=127.0.0.1 result=reject reason=block-filter" in log
    assert "client=198.51.100.20 forwarded_by=127.0.0.1 result=reject reason=blocklist" in log
    assert "forwarder=127.0.0.1 result=tempfail reason=no-received" in log
    assert [p for p in stack.milter.problems() if "result=tempfail reason=no-received" not in p] \
        == []
    # Postfix refused the three: nothing of them is queued or delivered.
    assert stack.postfix.queue_empty()
    assert stack.sink.messages == []


def test_xclient_from_a_trusted_forwarder_is_judged_at_connect(make_stack: Any) -> None:
    """A forwarder that sends XCLIENT hands the original address to connect() itself."""
    stack: Stack = make_stack("yaml", trusted_forwarders=[f"{FORWARDER}/32"])
    r = stack.send(["user@example.com"], client_ip="192.0.2.9")
    replies = [r.xclient, r.mail, *r.rcpts.values()]
    assert any(code(x) == 554 for x in replies if x), r
    ok = stack.send(["user@example.com"], client_ip="203.0.113.5")
    assert code(ok.data) == 250
    [(_, job)] = stack.jobs()
    assert (job.client.address, job.client.forwarded_by) == ("203.0.113.5", "")
