"""Scans end to end: real Postfix + milter with real spamd, clamd and a local DNS server.

Verdicts in the job and as headers on Postfix's copy in SES's order,
PROCESSING_FAILED when a scanner is down (the mail is still accepted), spam
and virus DISABLED without contacting any scanner for rules that do not ask
(SPF, DKIM and DMARC still run: SES authenticates every message), and forged
Authentication-Results (our authserv-id, however written) and X-SES verdicts
removed.
"""

from __future__ import annotations

import base64
import email
import socket
from collections.abc import Iterator
from email import policy
from typing import Any

import pytest

from harness.dns import DnsServer
from harness.scanners import GTUBE, eicar
from harness.stack import Stack

pytestmark = pytest.mark.postfix

SCAN_RULES = [
    {"name": "scanned", "enabled": True, "scan_enabled": True,
     "recipients": ["user@example.com"],
     "actions": [{"add_header": {"header_name": "X-Scanned-Rule", "header_value": "yes"}}]},
    {"name": "plain", "enabled": True, "recipients": ["other@example.com"],
     "actions": [{"add_header": {"header_name": "X-Plain-Rule", "header_value": "yes"}}]},
]
CLIENT = "192.0.2.7"  # allowed by the test filters (harness/stack.py)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer({"sender.test": {"TXT": [f"v=spf1 ip4:{CLIENT} -all"]}})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def silent_port() -> Iterator[socket.socket]:
    """A listener that counts as 'a scanner is there' but must never be called."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def scan_stack(make_stack: Any, dns: DnsServer, spam: str, virus: str) -> Stack:
    stack: Stack = make_stack(
        "yaml", rules=SCAN_RULES, delivery="deliver",
        scan={"spam": {"engine": "spamd", "address": spam},
              "virus": {"engine": "clamd", "address": virus},
              "dns": {"nameservers": [dns.address], "timeout": 2}, "timeout": 20})
    return stack


def mime(subject: str, body: str, attachment: bytes | None = None,
         extra: str = "") -> bytes:
    head = (f"From: <a@sender.test>\r\nTo: <user@example.com>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@sender.test>\r\n{extra}")
    if attachment is None:
        return (head + "\r\n" + body + "\r\n").encode()
    b64 = base64.encodebytes(attachment).decode().replace("\n", "\r\n")
    return (head + "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
            f"--b1\r\nContent-Type: text/plain\r\n\r\n{body}\r\n--b1\r\n"
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=test.com\r\n\r\n{b64}--b1--\r\n"
            ).encode()


def delivered_headers(stack: Stack, index: int) -> list[tuple[str, str]]:
    parsed = email.message_from_bytes(stack.sink.messages[index].data, policy=policy.compat32)
    return [(k, str(v)) for k, v in parsed.items()]


def test_gtube_and_clean_mail_get_ses_verdicts_and_headers_in_order(
        make_stack: Any, dns: DnsServer, spamd: Any, clamd: Any) -> None:
    stack = scan_stack(make_stack, dns, spamd.address, clamd.address)
    r = stack.send(["user@example.com"], mime("spammy", GTUBE), client_ip=CLIENT)
    assert r.data is not None and r.data[0] == 250
    stack.sink.wait_for(1)
    [(_, job)] = stack.jobs()
    assert job.verdicts == {"spam": "FAIL", "virus": "PASS", "spf": "PASS", "dkim": "GRAY",
                            "dmarc": "GRAY"}
    names = [n for n, _ in delivered_headers(stack, 0)]
    assert names[:6] == ["Received", "X-SES-Spam-Verdict", "X-SES-Virus-Verdict",
                         "Received-SPF", "Authentication-Results", "X-Scanned-Rule"], names
    headers = dict(delivered_headers(stack, 0))
    assert headers["X-SES-Spam-Verdict"] == "FAIL"
    assert headers["Authentication-Results"].startswith("mx.test;")
    assert "spf=pass" in headers["Authentication-Results"]
    assert [n for n, _ in job.auth_headers] == ["Received-SPF", "Authentication-Results"]
    assert dns.asked(), "SPF must have been looked up on the test DNS server"

    clean = stack.send(["user@example.com"], mime("lunch", "Lunch at noon?"), client_ip=CLIENT)
    assert clean.data is not None and clean.data[0] == 250
    stack.sink.wait_for(2)
    verdicts = sorted((j.verdicts["spam"], j.verdicts["virus"]) for _, j in stack.jobs())
    assert verdicts == [("FAIL", "PASS"), ("PASS", "PASS")]


def test_eicar_attachment_is_virus_fail(make_stack: Any, dns: DnsServer, spamd: Any,
                                        clamd: Any) -> None:
    stack = scan_stack(make_stack, dns, spamd.address, clamd.address)
    r = stack.send(["user@example.com"], mime("invoice", "see attached", eicar()),
                   client_ip=CLIENT)
    assert r.data is not None and r.data[0] == 250
    [(_, job)] = stack.jobs()
    assert job.verdicts["virus"] == "FAIL"
    assert "virus=FAIL" in stack.milter.log()


def test_scanners_down_give_processing_failed_and_mail_goes_on(
        make_stack: Any, dns: DnsServer) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    stack = scan_stack(make_stack, dns, f"127.0.0.1:{port}", f"127.0.0.1:{port}")
    r = stack.send(["user@example.com"], mime("hello", "hi"), client_ip=CLIENT)
    assert r.data is not None and r.data[0] == 250
    [(_, job)] = stack.jobs()
    assert job.verdicts["spam"] == job.verdicts["virus"] == "PROCESSING_FAILED"
    assert job.verdicts["spf"] == "PASS"


def test_rule_without_scan_enabled_authenticates_but_contacts_no_scanner(
        make_stack: Any, dns: DnsServer, silent_port: socket.socket) -> None:
    address = f"127.0.0.1:{silent_port.getsockname()[1]}"
    stack = scan_stack(make_stack, dns, address, address)
    r = stack.send(["other@example.com"], mime("plain", "hi"), client_ip=CLIENT)
    assert r.data is not None and r.data[0] == 250
    [(_, job)] = stack.jobs()
    assert job.verdicts == {"spam": "DISABLED", "virus": "DISABLED", "spf": "PASS",
                            "dkim": "GRAY", "dmarc": "GRAY"}
    with pytest.raises(BlockingIOError):
        silent_port.accept()  # no spam or virus scanner was contacted
    assert "sender.test" in dns.asked("TXT")  # SPF was looked up
    names = [n for n, _ in delivered_headers_after(stack)]
    assert names[:3] == ["Received", "Received-SPF", "Authentication-Results"], names
    assert "X-SES-Spam-Verdict" not in names and "X-SES-Virus-Verdict" not in names


def delivered_headers_after(stack: Stack) -> list[tuple[str, str]]:
    stack.sink.wait_for(1)
    return delivered_headers(stack, 0)


def test_forged_verdict_headers_are_removed(make_stack: Any, dns: DnsServer,
                                           spamd: Any, clamd: Any) -> None:
    stack = scan_stack(make_stack, dns, spamd.address, clamd.address)
    forged = ("Authentication-Results: mx.test; spf=pass smtp.mailfrom=ceo@example.com; "
              "dkim=pass header.d=example.com\r\n"
              "Authentication-Results: (x) mx.test; spf=pass smtp.mailfrom=ceo1@example.com\r\n"
              'Authentication-Results: "mx.test"; dkim=pass header.d=ceo2.example.com\r\n'
              "Authentication-Results: other.example; spf=none\r\n"
              "X-SES-Spam-Verdict: PASS-ceo3\r\nx-ses-virus-verdict: PASS-ceo4\r\n")
    r = stack.send(["user@example.com"], mime("forged", GTUBE, extra=forged), client_ip=CLIENT)
    assert r.data is not None and r.data[0] == 250
    stack.sink.wait_for(1)
    delivered = delivered_headers(stack, 0)
    results = [v for n, v in delivered if n == "Authentication-Results"]
    assert len(results) == 2 and results[0].startswith("mx.test; spf=pass smtp.mailfrom=a@")
    assert results[1] == "other.example; spf=none"  # not ours: kept
    # One spam verdict, ours (GTUBE is spam), and one virus verdict.
    assert [(n.lower(), v) for n, v in delivered if n.lower().startswith("x-ses-")] == [
        ("x-ses-spam-verdict", "FAIL"), ("x-ses-virus-verdict", "PASS")]
    assert b"ceo" not in stack.sink.messages[0].data
    [(job_id, _)] = stack.jobs()
    with open(stack.spool.message_path("incoming", job_id), "rb") as fh:
        stored = fh.read()
    assert b"ceo" not in stored and b"other.example; spf=none" in stored


def test_rspamd_engine_end_to_end(make_stack: Any, dns: DnsServer, rspamd: Any,
                                  clamd: Any) -> None:
    stack: Stack = make_stack(
        "yaml", rules=SCAN_RULES,
        scan={"spam": {"engine": "rspamd", "address": rspamd.address},
              "virus": {"engine": "clamd", "address": clamd.address},
              "dns": {"nameservers": [dns.address], "timeout": 2}, "timeout": 20})
    spam = stack.send(["user@example.com"], mime("spammy", GTUBE), client_ip=CLIENT)
    clean = stack.send(["user@example.com"], mime("lunch", "Lunch at noon?"), client_ip=CLIENT)
    assert spam.data is not None and spam.data[0] == 250
    assert clean.data is not None and clean.data[0] == 250
    by_subject = {}
    for job_id, job in stack.jobs():
        with open(stack.spool.message_path("incoming", job_id), "rb") as fh:
            subject = b"spammy" if b"Subject: spammy" in fh.read() else b"lunch"
        by_subject[subject] = job.verdicts["spam"]
    assert by_subject == {b"spammy": "FAIL", b"lunch": "PASS"}


def test_on_failure_tempfail_answers_451_and_spools_nothing(make_stack: Any,
                                                           dns: DnsServer) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    stack: Stack = make_stack(
        "yaml", rules=SCAN_RULES,
        scan={"spam": {"engine": "spamd", "address": address},
              "virus": {"engine": "clamd", "address": address},
              "dns": {"nameservers": [dns.address], "timeout": 2}, "timeout": 10,
              "on_failure": "tempfail"})
    r = stack.send(["user@example.com"], mime("later", "hi"), client_ip=CLIENT)
    assert r.data is not None and r.data[0] == 451 and "4.7.0" in r.data[1]
    assert stack.jobs() == []
    assert "reason=scan-failed scanners=spam,virus" in stack.milter.log()
