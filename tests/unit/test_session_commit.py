"""End of data around the commit: what is settled before it, and nothing after it fails.

Once the job is stored the client must get the stored outcome: a 451 then
would make it send the message again, and the job would run twice.  The
changes to Postfix's copy (headers, removed recipients) are settled before
the commit; a step after it that fails anyway is logged and counted.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from harness.dns import DnsServer
from mxrules.config import load
from mxrules.decision import CONTINUE, Engine
from mxrules.metrics import MilterMetrics
from mxrules.milter import session as session_module
from mxrules.milter.session import EomResult, Runtime, Session, postfix_form
from mxrules.spool import Spool

CONFIG = """\
hostname: mx.example.com
domains: [example.com]
delivery: consume
rule_sets:
  default:
    - name: all
      enabled: true
      recipients: [example.com]
      actions:
        - add_header: {header_name: X-All, header_value: "yes"}
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    # Every message is authenticated (SPF, DKIM, DMARC): its DNS is this local server.
    server = DnsServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def runtime(tmp_path, dns: DnsServer) -> Runtime:
    path = tmp_path / "mxrules.yaml"
    dns_config = f"scan: {{dns: {{nameservers: ['{dns.address}']}}}}\n"
    path.write_text(textwrap.dedent(CONFIG) + dns_config)
    return Runtime(Engine(load(str(path))), Spool(str(tmp_path / "spool")),
                   MilterMetrics(CollectorRegistry()))


def _metric(rt: Runtime, name: str, **labels: str) -> float:
    return rt.metrics.registry.get_sample_value(name, labels) or 0.0


def _message(rt: Runtime, rcpts: list[tuple[str, str]]) -> EomResult:
    """One message; each recipient as ({rcpt_addr} form, the client's RCPT TO text)."""
    session = Session(rt, conn_id="c1")
    assert session.connect("203.0.113.5", "mail.example.net") == CONTINUE
    assert session.mail("<s@example.net>", {}) == CONTINUE
    for parsed, raw in rcpts:
        session.rcpt(parsed, tls=False, recorded=postfix_form(raw))
    session.header("Subject", b"x")
    session.eoh()
    session.body(b"body\r\n")
    return session.eom("Q1")


@pytest.mark.parametrize(("raw", "recorded"), [
    pytest.param("<SUPPORT@EXAMPLE.COM>", "SUPPORT@EXAMPLE.COM", id="case-kept"),
    pytest.param("<Support+Tag@example.com>", "Support+Tag@example.com", id="plus-tag-kept"),
    pytest.param("<support@example.com.>", "support@example.com.", id="trailing-dot-kept"),
    pytest.param('<"Support Desk"@example.com>', '"Support Desk"@example.com',
                 id="quoted-local-part-kept"),
    pytest.param("<@a.test,@b.test:u@example.com>", "u@example.com", id="source-route-dropped"),
    pytest.param("u@example.com", "u@example.com", id="no-angle-brackets"),
    pytest.param("<u@example.com>>", "u@example.com>", id="one-pair-of-brackets-only"),
    pytest.param("<u@example.com", "<u@example.com", id="unclosed-bracket"),
    pytest.param("<>", "", id="empty"),
])
def test_postfix_form_is_the_text_smtpd_parsed(raw: str, recorded: str) -> None:
    assert postfix_form(raw) == recorded


def test_consume_removes_each_handled_recipient_as_recorded(runtime) -> None:
    result = _message(runtime, [
        ("<support@example.com>", "<SUPPORT@EXAMPLE.COM>"),
        ("<support@example.com>", "<support@example.com.>"),
        ("<support@example.com>", "<SUPPORT@EXAMPLE.COM>"),  # the same text twice: once
        ("<friend@other.test>", "<friend@other.test>"),
    ])
    assert result.reply == CONTINUE and result.message_id
    assert (result.discard, result.delete_recipients) == (
        False, ("SUPPORT@EXAMPLE.COM", "support@example.com."))


def test_a_recipient_pymilter_cannot_name_stays_and_is_reported(runtime, caplog) -> None:
    """Bytes that are not UTF-8 (SMTPUTF8 off) reach us as surrogates: no delrcpt for them."""
    caplog.set_level(logging.INFO, logger="mxrules")
    result = _message(runtime, [
        ("<us\udce9r@example.com>", "<us\udce9r@example.com>"),
        ("<ok@example.com>", "<OK@example.com>"),
        ("<friend@other.test>", "<friend@other.test>"),
    ])
    assert result.reply == CONTINUE
    assert result.delete_recipients == ("OK@example.com",)
    assert runtime.spool.ids("incoming") == [result.message_id]
    assert _metric(runtime, "mxrules_post_commit_errors_total", stage="remove-recipient") == 1
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"message_id={result.message_id}" in error and "us\ufffdr@example.com" in error


def test_a_failing_step_after_the_commit_keeps_the_stored_outcome(runtime, caplog,
                                                                   monkeypatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("metrics broke")

    monkeypatch.setattr(runtime.metrics.message_size, "observe", broken)
    result = _message(runtime, [("<a@example.com>", "<a@example.com>")])
    assert result.reply == CONTINUE and result.discard
    assert runtime.spool.ids("incoming") == [result.message_id]
    assert _metric(runtime, "mxrules_post_commit_errors_total", stage="bookkeeping") == 1
    assert any(r.levelno == logging.ERROR and result.message_id in r.getMessage()
               and "metrics broke" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("name", "value"), [
    pytest.param("X-Nul", "a\x00b", id="nul"),
    pytest.param("X-Lf", "a\nBcc: x@evil.test", id="lf"),
    pytest.param("X-Esc", "a\x1b[31m", id="escape"),
    pytest.param("X-Bytes", "caf\udce9", id="not-utf-8"),
    pytest.param("Bad Name", "x", id="space-in-name"),
    pytest.param("", "x", id="empty-name"),
])
def test_a_header_postfix_cannot_take_is_left_out_before_the_commit(
        runtime, caplog, monkeypatch, name: str, value: str) -> None:
    """The last check before the commit, behind the schema and the scan headers' sanitising."""
    monkeypatch.setattr(session_module, "in_stream_headers",
                        lambda plan: [("X-Good", "yes\tand tab"), (name, value)])
    result = _message(runtime, [("<a@example.com>", "<a@example.com>")])
    assert result.reply == CONTINUE
    # SPF/DKIM/DMARC's own headers (every message is authenticated), then the good one.
    assert [n for n, _ in result.add_headers] == ["Received-SPF", "Authentication-Results",
                                                  "X-Good"]
    assert result.add_headers[2] == ("X-Good", "yes\tand tab")
    job = runtime.spool.load("incoming", result.message_id)
    assert job.in_stream_headers == result.add_headers
    assert any(r.levelno == logging.ERROR and "header-left-out" in r.getMessage()
               for r in caplog.records)
