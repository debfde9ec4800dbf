"""The pymilter adapter at end of data: a change to Postfix's copy that fails is no 451.

libmilter cannot be made to fail on cue through a real Postfix, so its
per-connection context is replaced by a stand-in that answers the macro
look-ups and refuses the changes a case names, raising `milter.error` (Milter.error) as
pymilter's C module does when libmilter returns MI_FAILURE.  The message is
stored by then: the answer must stay the stored outcome.
"""

from __future__ import annotations

import textwrap
from typing import Any

import Milter
import pytest
from prometheus_client import CollectorRegistry

from harness.dns import DnsServer
from mxrules.config import load
from mxrules.decision import Engine
from mxrules.metrics import MilterMetrics
from mxrules.milter.adapter import MxrulesMilter
from mxrules.milter.session import Runtime
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
        - add_header: {header_name: X-One, header_value: "1"}
        - add_header: {header_name: X-Two, header_value: "2"}
"""


class Context:
    """Stands in for pymilter's milterContext: macros in, changes recorded."""

    def __init__(self, failing: set[str]) -> None:
        self.macros = {"i": "Q1", "{mail_addr}": "s@example.net"}
        self.failing = failing
        self.calls: list[tuple[Any, ...]] = []

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def _change(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.failing:
            raise Milter.error(f"cannot {name}")  # pymilter C module's milter.error

    def addheader(self, *args: Any) -> None:
        self._change("addheader", *args)

    def chgheader(self, *args: Any) -> None:
        self._change("chgheader", *args)

    def delrcpt(self, *args: Any) -> None:
        self._change("delrcpt", *args)

    def setreply(self, *args: Any) -> None:
        self.calls.append(("setreply", *args))

    def setpriv(self, _connection: object) -> None:
        pass


@pytest.fixture(scope="module")
def dns() -> Any:
    # Every message is authenticated (SPF, DKIM, DMARC): its DNS is this local server.
    server = DnsServer({"example.net": {"TXT": ["v=spf1 ip4:203.0.113.5 -all"]}})
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


def _deliver(rt: Runtime, ctx: Context, rcpts: list[tuple[str, str]]) -> int:
    """One message through the adapter; each recipient as (raw RCPT TO text, {rcpt_addr})."""
    class Connection(MxrulesMilter):
        runtime = rt

    conn = Connection()
    conn._setctx(ctx)
    assert conn.connect("mail.example.net", 4, ("203.0.113.5", 25)) == Milter.CONTINUE
    assert conn.envfrom("<s@example.net>") == Milter.CONTINUE
    for raw, parsed in rcpts:
        ctx.macros["{rcpt_addr}"] = parsed
        assert conn.envrcpt(raw) == Milter.CONTINUE
    conn.header("Subject", b"x")
    conn.eoh()
    conn.body(b"body\r\n")
    return int(conn.eom())


def _errors(rt: Runtime, stage: str) -> float:
    value = rt.metrics.registry.get_sample_value("mxrules_post_commit_errors_total",
                                                 {"stage": stage})
    return value or 0.0


@pytest.mark.parametrize(("failing", "stage"), [
    pytest.param({"addheader"}, "add-header", id="add-header"),
    pytest.param({"delrcpt"}, "remove-recipient", id="remove-recipient"),
    pytest.param({"addheader", "delrcpt"}, "add-header", id="both"),
])
def test_a_change_that_fails_after_the_commit_keeps_the_stored_answer(
        runtime, caplog, failing: set[str], stage: str) -> None:
    ctx = Context(failing)
    reply = _deliver(runtime, ctx, [("<SUPPORT@EXAMPLE.COM>", "support@example.com"),
                                    ("<friend@other.test>", "friend@other.test")])
    assert reply == Milter.CONTINUE
    [job_id] = runtime.spool.ids("incoming")
    # Every change was still tried, in order, and the recipient named as the client wrote it:
    # SPF/DKIM/DMARC's headers first (every message is authenticated), then the AddHeaders.
    assert [(c[0], c[1], c[-1]) for c in ctx.calls] == [
        ("addheader", "Received-SPF", 1), ("addheader", "Authentication-Results", 2),
        ("addheader", "X-One", 3), ("addheader", "X-Two", 4),
        ("delrcpt", "SUPPORT@EXAMPLE.COM", "SUPPORT@EXAMPLE.COM")]
    assert ctx.calls[2:4] == [("addheader", "X-One", "1", 3), ("addheader", "X-Two", "2", 4)]
    assert ctx.calls[0][2].startswith("pass (mx.example.com: domain of example.net designates")
    assert _errors(runtime, stage) == (4 if stage == "add-header" else 1)
    assert not any(c[0] == "setreply" for c in ctx.calls)
    assert any(job_id in r.getMessage() and "after commit" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")


def test_all_handled_recipients_discard_postfix_copy(runtime) -> None:
    ctx = Context(set())
    assert _deliver(runtime, ctx, [("<a@example.com>", "a@example.com")]) == Milter.DISCARD
    assert [c[0] for c in ctx.calls] == ["addheader"] * 4
