"""Trusted forwarders against a real Postfix (docs/ses-compatibility.md, "IP address filters").

The test client connects from 127.0.0.1, made a trusted forwarder here: it
plays one of the user's own relays, whose own `Received:` header (the topmost
one in the message it sends) names the original client.  Where the relay's
own behaviour matters, a second real Postfix is the relay.
"""

from __future__ import annotations

import email
import shutil
import tempfile
from collections.abc import Iterator
from email import policy
from pathlib import Path
from typing import Any

import pytest

from harness.exim import Exim, require_exim
from harness.faults import sample, scrape
from harness.ports import free_port
from harness.postfix import Postfix
from harness.smtp import send
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


# -- the relay's Received header as MTAs write it (issue: IP filters bypassed) -------------

EXIM_BY = ("\r\n\tby exim-relay.example.net with esmtp (Exim 4.96)\r\n"
           "\t(envelope-from <a@sender.test>)\r\n\tid 1xYdAs-00033T-09\r\n"
           "\tfor user@example.com;\r\n\tSat, 28 Nov 2026 09:59:59 +0000")
EXCHANGE_BY = (" by EXCH01.corp.example (10.0.0.6) with Microsoft SMTP\r\n Server "
               "(version=TLS1_2, cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id\r\n "
               "15.1.2507.39; Sat, 28 Nov 2026 09:59:59 +0000")


@pytest.mark.parametrize(
    ("received", "client"),
    [
        # 192.0.2.9 is blocked (bad-net); the HELO names 192.0.2.7, which an Allow filter
        # lets through: read from the HELO, the blocked client got in.
        pytest.param(f"from [192.0.2.9] (helo=[192.0.2.7]){EXIM_BY}", "192.0.2.9",
                     id="exim-blocked-client-allowed-helo"),
        pytest.param(f"from [192.0.2.7] (192.0.2.9){EXCHANGE_BY}", "192.0.2.9",
                     id="exchange-blocked-client-allowed-helo"),
        # And the other way round: an allowed client whose HELO names a blocked address.
        pytest.param(f"from [203.0.113.5] (helo=[192.0.2.9]){EXIM_BY}", "203.0.113.5",
                     id="exim-allowed-client-blocked-helo"),
        pytest.param(f"from [192.0.2.9] (203.0.113.5){EXCHANGE_BY}", "203.0.113.5",
                     id="exchange-allowed-client-blocked-helo"),
    ],
)
def test_the_helo_of_an_exim_or_exchange_relay_is_never_the_client(
        make_stack: Any, received: str, client: str) -> None:
    stack: Stack = make_stack("yaml", trusted_forwarders=[f"{FORWARDER}/32"])
    rcpts = ["user@example.com"]
    r = stack.send(rcpts, f"Received: {received}\r\n".encode() + message("a@sender.test", rcpts))
    if client == "192.0.2.9":
        assert code(r.data) == 554, r
        assert r.data is not None
        assert "5.7.1 Client host [192.0.2.9] blocked by IP address filter" in r.data[1]
        assert stack.jobs() == []
    else:
        assert code(r.data) == 250, r
        [(_, job)] = stack.jobs()
        assert (job.client.address, job.client.forwarded_by) == (client, FORWARDER)


@pytest.fixture
def exim_dir() -> Iterator[Path]:
    """A directory the `mail` account can reach (Exim drops to it to deliver)."""
    require_exim()
    directory = Path(tempfile.mkdtemp(prefix="mxrules-exim-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    ("client", "helo"),
    [pytest.param("192.0.2.9", "[192.0.2.7]", id="blocked-client-allowed-helo"),
     pytest.param("203.0.113.5", "[192.0.2.9]", id="allowed-client-blocked-helo")],
)
def test_a_real_exim_relay_is_judged_by_its_client_not_its_helo(
        make_stack: Any, exim_dir: Path, client: str, helo: str) -> None:
    """Exim 4.96 as the trusted forwarder: `from [CLIENT] (helo=[HELO])`, written by Exim."""
    stack: Stack = make_stack("yaml", trusted_forwarders=[f"{FORWARDER}/32"])
    exim = Exim(exim_dir, stack.postfix.smtp_port)
    exim.setup()
    queued = exim.take(client, helo, "", ["user@example.com"],
                       message("a@sender.test", ["user@example.com"]))
    attempt = exim.deliver(queued)
    if client == "192.0.2.9":
        assert "554 5.7.1 Client host [192.0.2.9] blocked by IP address filter" in attempt, \
            attempt
        assert stack.jobs() == []
    else:
        assert 'C="250 2.0.0 Ok' in attempt, attempt
        [(job_id, job)] = stack.jobs()
        assert (job.client.address, job.client.forwarded_by) == (client, FORWARDER)
        with open(stack.spool.message_path("incoming", job_id), "rb") as fh:
            stored = fh.read()
        assert stored.startswith(f"Received: from [{client}] (helo={helo})\r\n\tby "
                                 "exim-relay.example.net with esmtp (Exim 4.96)".encode())


def _mx_with_relay(make_stack: Any, postfix_factory: Any, relay_main_cf: dict[str, str] | None
                   = None, **config: Any) -> tuple[Stack, Postfix, int]:
    """The mxrules stack behind a second, stock Postfix relay (a trusted forwarder)."""
    metrics = free_port()
    stack: Stack = make_stack("yaml", trusted_forwarders=[f"{FORWARDER}/32"],
                              metrics={"milter_listen": f"127.0.0.1:{metrics}"}, **config)
    relay: Postfix = postfix_factory(relay_port=stack.postfix.smtp_port, extra={
        "myhostname": "relay.example.net", **(relay_main_cf or {})})
    return stack, relay, metrics


def test_a_long_helo_through_a_real_postfix_relay_does_not_hide_the_client(
        make_stack: Any, postfix_factory: Any) -> None:
    """A blocked client, a 1,100-character HELO, a stock Postfix relay in trusted_forwarders.

    The relay's Received header is longer than 1,024 bytes and its smtp client
    breaks the line inside the HELO: the address comes after both.  The client
    is found and refused, as at a direct connection; nothing is stored.
    """
    stack, relay, metrics = _mx_with_relay(make_stack, postfix_factory)
    # The relay takes the message from 192.0.2.9 (XCLIENT plays the client) with a null
    # sender, so that its refusal makes no bounce.
    r = send("127.0.0.1", relay.smtp_port, "", ["user@example.com"],
             message("a@sender.test", ["user@example.com"]), client_ip="192.0.2.9",
             helo="A" * 1100)
    assert code(r.data) == 250, r  # the relay queued it
    relay.wait_for_log(r"status=bounced .*554 5\.7\.1 Client host \[192\.0\.2\.9\] "
                       r"blocked by IP address filter")
    assert stack.jobs() == []
    assert "client=192.0.2.9 forwarded_by=127.0.0.1 result=reject reason=block-filter" \
        in stack.milter.log()
    samples = scrape(metrics)
    assert sample(samples, "mxrules_rejections_total", stage="data", reason="block-filter") == 1
    assert sample(samples, "mxrules_messages_total", result="spooled") == 0


@pytest.mark.parametrize("policy", ["tempfail", "reject"])
def test_a_client_the_relay_does_not_name_is_never_judged_as_the_relay(
        make_stack: Any, postfix_factory: Any, policy: str) -> None:
    """The same blocked client and HELO, through a relay whose header_size_limit cuts it.

    The relay's own cleanup keeps only the first 1,024 bytes of its Received
    header, so it names no client.  The message is not judged as the relay
    (which the filters would pass and SPF would judge): it gets
    forwarder_unresolved's answer, and is counted.
    """
    setting = {"forwarder_unresolved": "reject"} if policy == "reject" else {}  # or default
    stack, relay, metrics = _mx_with_relay(
        make_stack, postfix_factory, relay_main_cf={"header_size_limit": "1024"}, **setting)
    r = send("127.0.0.1", relay.smtp_port, "", ["user@example.com"],
             message("a@sender.test", ["user@example.com"]), client_ip="192.0.2.9",
             helo="A" * 1100)
    assert code(r.data) == 250, r
    if policy == "tempfail":
        relay.wait_for_log(r"status=deferred .*451 4\.7\.1 Original client of forwarded "
                           r"message unknown")
        assert relay.queue_ids() != []  # the relay keeps it and retries
    else:
        relay.wait_for_log(r"status=bounced .*554 5\.7\.1 Original client of forwarded "
                           r"message unknown")
    assert stack.jobs() == []
    assert (f"forwarder=127.0.0.1 result={policy} reason=unparsable-received"
            in stack.milter.log())
    # Counted before the milter answered, so before the relay logged the answer.
    samples = scrape(metrics)
    assert sample(samples, "mxrules_forwarded_unresolved_total",
                  reason="unparsable-received") == 1
    assert sample(samples, "mxrules_messages_total",
                  result="rejected" if policy == "reject" else "tempfail") == 1
    assert sample(samples, "mxrules_messages_total", result="spooled") == 0


def test_mail_the_relay_made_itself_is_not_judged_as_the_relay(
        make_stack: Any, postfix_factory: Any) -> None:
    """A local submission on the relay (`Received: by relay (Postfix, from userid 0)`)."""
    stack, relay, metrics = _mx_with_relay(make_stack, postfix_factory)
    relay.submit("", ["user@example.com"], message("root@relay.example.net",
                                                   ["user@example.com"]))
    relay.wait_for_log(r"status=deferred .*451 4\.7\.1 Original client of forwarded message")
    assert stack.jobs() == []
    assert sample(scrape(metrics), "mxrules_forwarded_unresolved_total",
                  reason="unparsable-received") == 1
