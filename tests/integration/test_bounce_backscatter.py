"""Bounce without backscatter: real Postfix + milter + worker + local DNS + aiosmtpd sink.

The attack: mail whose envelope sender is someone else's address, to a recipient
whose rule bounces, makes the MX mail its DSN to that someone (backscatter), with
whatever headers and recipients the attacker chose.  Here every message goes in
through Postfix (XCLIENT from CLIENT) and the milter, which computes SPF against the
test DNS server; the worker sends DSNs back through the same Postfix, which relays
them to the sink, so the sink holds exactly what would have left the machine.

The rules here bounce after an AddHeader, so the recipient is accepted and the
worker decides; a rule that does nothing but bounce is refused at RCPT instead
(the last test).
"""

from __future__ import annotations

import email
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.dns import DnsServer
from harness.mxrules_proc import MilterProcess, WorkerProcess
from harness.ports import free_port
from harness.postfix import Postfix
from harness.sink import Message, SmtpSink
from harness.smtp import Result, send
from harness.stack import message, write_config
from harness.waiting import wait_until
from mxrules.spool import STATES, Spool

pytestmark = pytest.mark.postfix

CLIENT = "192.0.2.7"  # allowed by the harness's IP filters
GOOD = "good.test"  # SPF: CLIENT may send for it
VICTIM = "victim.test"  # SPF: nobody may send for it (`-all`), yet a forger uses it
MAX_DSN = 64 * 1024

BOUNCE = {"smtp_reply_code": "550", "status_code": "5.1.1",
          "message": "Mailbox does not exist", "sender": "mailer-daemon@example.com"}
# AddHeader first: the recipient is accepted and the Bounce runs in the worker.
RULES = [{"name": "departed", "enabled": True, "scan_enabled": True,
          "recipients": ["example.com"],
          "actions": [{"add_header": {"header_name": "X-Departed", "header_value": "yes"}},
                      {"bounce": BOUNCE}]}]


@dataclass
class Loop:
    dir: Path
    dns: DnsServer
    milter: MilterProcess
    worker: WorkerProcess
    postfix: Postfix
    sink: SmtpSink
    spool: Spool

    def send(self, sender: str, rcpts: list[str], msg: bytes | None = None) -> Result:
        return send("127.0.0.1", self.postfix.smtp_port, sender, rcpts,
                    msg or message(sender, rcpts), client_ip=CLIENT)

    def accepted(self, sender: str, rcpts: list[str], msg: bytes | None = None) -> None:
        r = self.send(sender, rcpts, msg)
        assert r.data is not None and r.data[0] == 250, r

    def settle(self, jobs: int, timeout: float = 60) -> None:
        """Wait until the worker finished `jobs` jobs and Postfix delivered all it took.

        A DSN is handed to Postfix before its job is done, so once both hold,
        every DSN there will be is in the sink: nothing more can arrive.
        """
        def idle() -> bool:
            counts = {s: len(self.spool.ids(s)) for s in STATES}
            return (counts["incoming"] == counts["active"] == counts["deferred"] == 0
                    and self.worker.log().count("job done ") >= jobs
                    and self.postfix.queue_empty())
        wait_until(idle, f"{jobs} jobs done\n{self.worker.log()[-3000:]}", timeout)

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.worker.port}/metrics",
                                      timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise AssertionError(f"no sample {name}{labels}")

    def dsns(self) -> list[Message]:
        """What the sink got with the null envelope sender: DSNs (mxrules' or Postfix's)."""
        return [m for m in self.sink.messages if m.mail_from in ("", "<>")]

    def spooled_ids(self, sender: str) -> set[str]:
        """Message ids the milter spooled for `sender` (from its eom log lines)."""
        pattern = rf"message_id=(\S+) sender={re.escape(sender)} .*result=spooled"
        return set(re.findall(pattern, self.milter.log()))


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer({GOOD: {"TXT": [f"v=spf1 ip4:{CLIENT} -all"]},
                        VICTIM: {"TXT": ["v=spf1 -all"]}})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_loop(dns: DnsServer, postfix_factory: Any, smtp_sink: SmtpSink,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    procs: list[MilterProcess | WorkerProcess] = []

    def make(rules: list[dict[str, Any]] = RULES, **bounce: Any) -> Loop:
        directory = tmp_path_factory.mktemp("bounce")
        milter_port, worker_port = free_port(), free_port()

        def config(relay_port: int) -> Path:
            return write_config(
                directory, port=milter_port, rules=rules,
                metrics={"milter_listen": "", "worker_listen": f"127.0.0.1:{worker_port}"},
                worker={"threads": 1, "scan_interval": 0.05, "retry_initial_delay": 0.05,
                        "retry_max_delay": 0.5},
                scan={"dns": {"nameservers": [dns.address], "timeout": 2}, "timeout": 20},
                bounce={"smtp_relay": f"127.0.0.1:{relay_port}", "timeout": 10, **bounce})

        path = config(smtp_sink.port)
        milter = MilterProcess(path, milter_port, directory / "milter.log")
        worker = WorkerProcess(path, worker_port, directory / "worker.log")
        procs.extend([milter, worker])
        milter.start()
        postfix = postfix_factory(milter=milter.postfix_spec, relay_port=smtp_sink.port)
        config(postfix.smtp_port)  # DSNs go out through Postfix, as with the default relay
        worker.start()
        return Loop(directory, dns, milter, worker, postfix, smtp_sink,
                    Spool(str(directory / "spool")))

    yield make
    for p in procs:
        p.stop()


def _parse(dsn: Message) -> EmailMessage:
    return cast(EmailMessage, email.message_from_bytes(dsn.data, policy=policy.default))


def test_forged_senders_get_no_dsn_and_an_authenticated_sender_does(make_loop: Any) -> None:
    loop: Loop = make_loop()
    for i in range(10):
        loop.accepted(f"someone{i}@{VICTIM}", ["gone@example.com"])
    loop.accepted(f"alice@{GOOD}", ["gone@example.com"])
    loop.settle(11)

    [dsn] = loop.dsns()
    assert dsn.rcpt_tos == (f"alice@{GOOD}",)
    assert "Final-Recipient: rfc822; gone@example.com" in dsn.data.decode()

    # Ten suppressions, each logged with its message id, counted, and the job done.
    forged = set().union(*(loop.spooled_ids(f"someone{i}@{VICTIM}") for i in range(10)))
    assert len(forged) == 10
    logged = re.findall(r"^INFO .*bounce suppressed message_id=(\S+) .*reason=unauthenticated"
                        r" .*spf=FAIL", loop.worker.log(), re.M)
    assert sorted(logged) == sorted(forged)
    assert loop.metric("mxrules_bounces_suppressed_total", reason="unauthenticated") == 10
    assert loop.metric("mxrules_actions_total", type="Bounce", outcome="ok") == 11
    assert loop.metric("mxrules_actions_total", type="Bounce", outcome="failed") == 0
    assert loop.spool.ids("failed") == []
    assert loop.worker.problems() == []


def test_rate_limits_per_sender_and_per_client(make_loop: Any) -> None:
    loop: Loop = make_loop(rate_limit={"per_sender": 2, "per_client_ip": 3, "period": 3600})
    for _ in range(3):
        loop.accepted(f"alice@{GOOD}", ["gone@example.com"])
    loop.settle(3)
    # Alice's third is over her limit; it did not count against the client.
    for _ in range(2):
        loop.accepted(f"bob@{GOOD}", ["gone@example.com"])
    loop.settle(5)

    got = sorted(m.rcpt_tos[0] for m in loop.dsns())
    assert got == [f"alice@{GOOD}", f"alice@{GOOD}", f"bob@{GOOD}"]
    assert loop.metric("mxrules_bounces_suppressed_total", reason="sender-rate") == 1
    assert loop.metric("mxrules_bounces_suppressed_total", reason="client-rate") == 1
    log = loop.worker.log()
    assert len(re.findall(r"bounce suppressed message_id=\S+ .*reason=sender-rate "
                          rf"sender=alice@{GOOD} client={CLIENT}", log)) == 1
    assert len(re.findall(r"bounce suppressed message_id=\S+ .*reason=client-rate "
                          rf"sender=bob@{GOOD} client={CLIENT}", log)) == 1
    assert loop.spool.ids("failed") == []


def test_900_recipients_and_40k_of_headers_give_a_dsn_under_64k(make_loop: Any) -> None:
    loop: Loop = make_loop()
    rcpts = [f"user{i:04d}@example.com" for i in range(900)]
    junk = "".join(f"X-Junk-{i:03d}: {'j' * 990}\r\n" for i in range(40))
    msg = (f"From: <alice@{GOOD}>\r\nTo: <all@example.com>\r\nSubject: big\r\n"
           f"Message-ID: <big@{GOOD}>\r\n{junk}\r\nHello.\r\n").encode()
    loop.accepted(f"alice@{GOOD}", rcpts, msg)
    loop.settle(1)

    [dsn] = loop.dsns()
    assert len(dsn.data) <= MAX_DSN, len(dsn.data)
    parsed = _parse(dsn)
    assert parsed.get_content_type() == "multipart/report"
    human, report, headers = cast(list[EmailMessage], parsed.get_payload())
    listed = re.findall(r"^Final-Recipient: rfc822; (\S+)$", str(report), re.M)
    assert 0 < len(listed) < 900 and listed == rcpts[:len(listed)]
    text = " ".join(str(human.get_content()).split())
    assert f"... and {900 - len(listed)} more: the list was cut" in text
    assert "the headers were cut" in text
    returned = headers.get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert b"Subject: big\r\n" in returned and returned.count(b"X-Junk-") < 40


def test_bounce_only_rule_is_refused_at_rcpt_and_sends_nothing(make_loop: Any) -> None:
    rules = [
        {"name": "departed", "enabled": True, "recipients": ["gone@example.com"],
         "actions": [{"bounce": {**BOUNCE, "message": "Mailbox does not exist (100% gone)"}},
                     {"stop": {"scope": "RuleSet"}}]},
        {"name": "kept", "enabled": True, "recipients": ["example.com"],
         "actions": [{"add_header": {"header_name": "X-Kept", "header_value": "yes"}}]},
    ]
    loop: Loop = make_loop(rules)
    r = loop.send(f"someone@{VICTIM}", ["gone@example.com", "here@example.com"])

    assert r.rcpts["gone@example.com"] == (550, "5.1.1 Mailbox does not exist (100% gone)")
    assert r.rcpts["here@example.com"][0] == 250
    assert r.data is not None and r.data[0] == 250
    loop.settle(1)
    assert loop.dsns() == []
    assert "result=bounced rules=departed,kept" in loop.milter.log()
    assert "bounce suppressed" not in loop.worker.log()
