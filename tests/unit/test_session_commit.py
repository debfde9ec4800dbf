"""End of data: the changes to Postfix's copy of a stored message."""

from __future__ import annotations

import textwrap

import pytest
from prometheus_client import CollectorRegistry

from mxrules.config import load
from mxrules.decision import CONTINUE, Engine
from mxrules.metrics import MilterMetrics
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


@pytest.fixture
def runtime(tmp_path) -> Runtime:
    path = tmp_path / "mxrules.yaml"
    path.write_text(textwrap.dedent(CONFIG))
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
