"""Scans of large mail keep the milter's memory bounded; scan slots limit how many run at once.

Real Postfix and milter, real spamd and clamd, the local DNS server (SPF, the DKIM
key, DMARC). The milter's peak resident set is read from /proc/PID/status (VmHWM).
Before the scans streamed, one 9.5 MiB message took the milter from 43 to 226 MiB
(dkimpy held the whole message, and the From header was parsed from a decoded copy
of all of it), and several at once multiplied that.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.dns import DkimKey, DnsServer, make_dkim_key
from harness.faults import sample, scrape
from harness.ports import free_port
from harness.scanners import HangingServer
from harness.smtp import Client
from harness.stack import Stack
from harness.waiting import wait_until

pytestmark = pytest.mark.postfix

CLIENT = "192.0.2.7"  # allowed by the test filters (harness/stack.py)
RULES = [{"name": "scanned", "enabled": True, "scan_enabled": True,
          "recipients": ["user@example.com"]}]
MIB = 1024 * 1024
# What scanning several 10 MB messages at once may add to the milter's peak RSS
# (measured: under 10 MiB; bench/README.md has the benchmark).
GROWTH_LIMIT = 64 * MIB
AT_ONCE = 6


@pytest.fixture(scope="module")
def key() -> DkimKey:
    return make_dkim_key()


@pytest.fixture
def dns(key: DkimKey) -> Iterator[DnsServer]:
    server = DnsServer({
        "sender.test": {"TXT": [f"v=spf1 ip4:{CLIENT} -all"]},
        "sel1._domainkey.sender.test": {"TXT": [key.record]},
        "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
    })
    server.start()
    yield server
    server.stop()


def big_message(size: int, subject: str) -> bytes:
    line = b"x" * 76 + b"\r\n"
    head = (f"From: <a@sender.test>\r\nTo: <user@example.com>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@sender.test>\r\n\r\n").encode()
    return head + line * ((size - len(head)) // len(line))


def deliver(stack: Stack, msg: bytes, timeout: float = 240) -> tuple[int, str]:
    with Client("127.0.0.1", stack.postfix.smtp_port, timeout=timeout) as c:
        c.ehlo()
        c.xclient(CLIENT)
        c.mail("a@sender.test")
        c.rcpt("user@example.com")
        return c.data(msg)


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.M)
    assert match is not None, status
    return int(match.group(1)) * 1024


def test_large_scanned_messages_at_once_keep_milter_memory_bounded(
        make_stack: Any, dns: DnsServer, key: DkimKey, spamd: Any, clamd: Any) -> None:
    # Defaults for everything the scans do (sizes, slots); 10^7 bytes stays under the
    # spam scanner's default 10 MiB, so spamd, clamd, SPF, DKIM and DMARC all run.
    stack: Stack = make_stack(
        "yaml", rules=RULES,
        scan={"spam": {"engine": "spamd", "address": spamd.address},
              "virus": {"engine": "clamd", "address": clamd.address},
              "dns": {"nameservers": [dns.address], "timeout": 5}})
    assert stack.milter.proc is not None
    pid = stack.milter.proc.pid
    warm = key.sign(big_message(2000, "warm"), "sel1", "sender.test")
    assert deliver(stack, warm)[0] == 250  # imports and first-use allocations
    before = peak_rss(pid)

    msg = key.sign(big_message(10_000_000, "big"), "sel1", "sender.test")
    replies: list[tuple[int, str]] = []
    threads = [threading.Thread(target=lambda: replies.append(deliver(stack, msg)))
               for _ in range(AT_ONCE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    growth = peak_rss(pid) - before

    assert [code for code, _ in replies] == [250] * AT_ONCE, replies
    big = [job for _, job in stack.jobs() if job.message_size > 1_000_000]
    assert [job.verdicts for job in big] == [
        {"spam": "PASS", "virus": "PASS", "spf": "PASS", "dkim": "PASS", "dmarc": "PASS"},
    ] * AT_ONCE
    assert growth <= GROWTH_LIMIT, (
        f"{AT_ONCE} scanned 10 MB messages grew the milter's peak RSS by "
        f"{growth / MIB:.1f} MiB (from {before / MIB:.1f} MiB)")


@pytest.mark.parametrize(("wait_timeout", "second"), [
    pytest.param(0.5, 451, id="no-slot-in-time-is-451"),
    pytest.param(60, 250, id="waits-for-the-slot"),
])
def test_a_message_waits_for_a_scan_slot_then_tempfails(
        make_stack: Any, dns: DnsServer, wait_timeout: float, second: int) -> None:
    metrics_port = free_port()
    with HangingServer() as stuck:
        # One slot, held ~3 s by each message: the spam scanner never answers.
        stack: Stack = make_stack(
            "yaml", rules=RULES, metrics={"milter_listen": f"127.0.0.1:{metrics_port}"},
            scan={"spam": {"engine": "spamd", "address": stuck.address},
                  "dns": {"nameservers": [dns.address], "timeout": 2}, "timeout": 3,
                  "concurrency": 1, "wait_timeout": wait_timeout})
        first: list[tuple[int, str, float]] = []

        def send_first() -> None:
            code, text = deliver(stack, big_message(5000, "first"), timeout=60)
            first.append((code, text, time.monotonic()))

        thread = threading.Thread(target=send_first)
        thread.start()
        wait_until(lambda: stuck.accepted >= 1, "the first message's scan to start")
        code, text = deliver(stack, big_message(5000, "second"), timeout=60)
        answered = time.monotonic()
        thread.join()

    assert first and first[0][0] == 250, first
    assert code == second, (code, text)
    stored = len(stack.jobs())
    timeouts = sample(scrape(metrics_port), "mxrules_scan_slot_timeouts_total")
    if second == 451:
        assert "4.7.0" in text
        assert answered < first[0][2], "refused while the slot was still held"
        assert stuck.accepted == 1 and stored == 1 and timeouts == 1
        assert "result=tempfail reason=scan-slots-busy" in stack.milter.log()
    else:
        assert answered > first[0][2], "scanned only after the first message let go"
        assert stuck.accepted == 2 and stored == 2 and timeouts == 0
