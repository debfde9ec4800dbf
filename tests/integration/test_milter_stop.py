"""Stopping the real milter with SIGTERM, SIGHUP and SIGINT, behind a real Postfix.

Each signal must stop it through its own code: the "milter stopped" line, exit
status 0, within libmilter's 5 s poll (and a margin for a shared machine).
With Postfix sessions idle, they are answered 4xx once the milter is gone.
With a message at end of data, its reception open in tmp/ while a stuck
scanner holds it, the reception is dropped: nothing half-received stays in
tmp/, no job appears, and the client is answered 4xx (it sends the message
again; nothing it was given 250 for is lost).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness.dns import DnsServer
from harness.scanners import HangingServer
from harness.smtp import Raw, Result
from harness.stack import Stack, message
from harness.waiting import wait_until

pytestmark = pytest.mark.postfix

SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGHUP, id="SIGHUP"),
           pytest.param(signal.SIGINT, id="SIGINT")]
# libmilter's listener looks for a stop request every 5 s; the rest is for a busy machine.
STOP_WITHIN = 10.0
IDLE = 3


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer({})
    server.start()
    yield server
    server.stop()


def stop_with(stack: Stack, sig: signal.Signals) -> tuple[int, float, str]:
    """Send `sig`; the exit status, the seconds it took, and what the milter logged."""
    proc = stack.milter.proc
    assert proc is not None and proc.poll() is None
    log_at = len(stack.milter.log())
    started = time.monotonic()
    stack.milter.signal(sig)
    try:
        status = proc.wait(STOP_WITHIN)
    except subprocess.TimeoutExpired:
        stack.milter.kill()
        pytest.fail(f"{sig.name}: still running after {STOP_WITHIN} s:\n{stack.milter.log()}")
    return status, time.monotonic() - started, stack.milter.log()[log_at:]


@pytest.mark.parametrize("sig", SIGNALS)
def test_stop_with_idle_sessions(make_stack: Any, sig: signal.Signals) -> None:
    stack: Stack = make_stack("yaml")
    sent = stack.send(["user@example.com"])
    assert sent.data is not None and sent.data[0] == 250, sent
    idle = []
    for _ in range(IDLE):
        raw = Raw(stack.postfix.smtp_port)
        assert raw.cmd(b"EHLO client.test")[0] == 250
        idle.append(raw)
    try:
        # One milter connection per SMTP session, made at connect.
        wait_until(lambda: stack.milter.log().count("connect conn=") >= IDLE + 1,
                   "Postfix to connect the idle sessions to the milter")
        status, took, log = stop_with(stack, sig)
        assert status == 0, (took, stack.milter.log())
        assert "INFO mxrules.milter: milter stopped\n" in log, log
        assert stack.milter.problems() == []
        # Without its milter, Postfix takes no more mail on those sessions.
        for raw in idle:
            code, text = raw.cmd(b"MAIL FROM:<a@sender.test>")
            assert 400 <= code < 500, (code, text)
    finally:
        for raw in idle:
            raw.sock.close()
    assert len(stack.jobs()) == 1
    assert stack.spool.ids("tmp") == []


SCANNED = [{"name": "scanned", "enabled": True, "scan_enabled": True,
            "recipients": ["user@example.com"],
            "actions": [{"s3": {"bucket_name": "mail-bucket"}}]}]


@pytest.mark.parametrize("sig", SIGNALS)
def test_stop_with_a_message_at_end_of_data(make_stack: Any, dns: DnsServer,
                                            hanging_server: HangingServer,
                                            sig: signal.Signals) -> None:
    stack: Stack = make_stack(
        "yaml", rules=SCANNED,
        scan={"spam": {"engine": "spamd", "address": hanging_server.address},
              "dns": {"nameservers": [dns.address], "timeout": 2}, "timeout": 120,
              "wait_timeout": 10})
    results: list[Result] = []
    client = threading.Thread(target=lambda: results.append(stack.send(
        ["user@example.com"], message("a@sender.test", ["user@example.com"], "held"))),
        daemon=True)
    client.start()
    # The whole message is in tmp/ and the milter waits for the stuck scanner.
    wait_until(lambda: hanging_server.accepted and stack.spool.ids("tmp"),
               "the milter to scan the message")
    [reception] = stack.spool.ids("tmp")

    status, took, log = stop_with(stack, sig)
    assert status == 0, (took, stack.milter.log())
    assert "milter stopping: dropped=1 " in log, log
    assert "INFO mxrules.milter: milter stopped\n" in log, log
    assert stack.milter.problems() == []
    assert stack.spool.ids("tmp") == [], reception
    assert stack.jobs() == []

    client.join(60)
    [result] = results
    assert result.data is not None and 400 <= result.data[0] < 500, result
