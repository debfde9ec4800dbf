"""The per-connection state machine, driven with plain values (no pymilter)."""

from __future__ import annotations

import hashlib
import logging
import os
import textwrap

import pytest
from prometheus_client import CollectorRegistry

from harness.dns import DnsServer
from mxrules import payload
from mxrules.config import load
from mxrules.decision import (
    CONTINUE,
    TEMPFAIL_INTERNAL,
    TEMPFAIL_SPOOL,
    TOO_BIG,
    TOO_BIG_FOR_ACTIONS,
    Engine,
)
from mxrules.ids import is_message_id
from mxrules.metrics import MilterMetrics
from mxrules.milter.session import (
    DISABLED_VERDICTS,
    EomResult,
    Runtime,
    Session,
)
from mxrules.spool import STATES, Client, Spool

CONFIG = """\
hostname: mx.example.com
domains: [example.com, secure.example.com]
max_message_size: 4096
trusted_forwarders: [192.0.2.250/32]
ip_filters:
  - {name: bad-net, policy: Block, cidr: 198.51.100.0/24}
rule_sets:
  default:
    - name: info
      enabled: true
      recipients: [info@example.com]
      actions:
        - add_header: {header_name: X-Info, header_value: info-rule}
        - s3: {bucket_name: mail-bucket}
    - name: everyone
      enabled: true
      recipients: [example.com]
      actions:
        - add_header: {header_name: X-Everyone, header_value: "yes"}
        - lambda:
            function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f"
            invocation_type: RequestResponse
        - add_header: {header_name: X-After-Lambda, header_value: stored-copy-only}
    - name: secure
      enabled: true
      tls_policy: Require
      recipients: [secure.example.com]
"""

HEADERS = [
    ("From", b"Sender <sender@example.net>"),
    ("To", b"info@example.com"),
    ("Subject", b"Hello\n there"),  # folded: pymilter gives LF, the spool keeps CRLF
]
BODY = [b"First line\r\n", b"second line\r\n"]
RAW = (b"From:Sender <sender@example.net>\r\nTo:info@example.com\r\n"
       b"Subject:Hello\r\n there\r\n\r\nFirst line\r\nsecond line\r\n")


# SPF, DKIM and DMARC run on every handled message: their DNS is this local server's.
ZONE = {"example.net": {"TXT": ["v=spf1 ip4:203.0.113.5 -all"]},
        "_dmarc.example.net": {"TXT": ["v=DMARC1; p=reject"]}}
_DNS = DnsServer(ZONE)


@pytest.fixture(scope="module", autouse=True)
def _dns_server():
    _DNS.servfail.add("servfail.example")
    _DNS.start()
    yield
    _DNS.stop()


def _config(tmp_path, text: str = CONFIG, name: str = "mxrules.yaml"):
    path = tmp_path / name
    text = textwrap.dedent(text)
    if "\nscan:" not in "\n" + text:
        text += f"scan:\n  dns: {{nameservers: ['{_DNS.address}'], timeout: 2}}\n"
    path.write_text(text)
    return load(str(path))


@pytest.fixture
def runtime(tmp_path) -> Runtime:
    return Runtime(Engine(_config(tmp_path)), Spool(str(tmp_path / "spool")),
                   MilterMetrics(CollectorRegistry()))


def _metric(rt: Runtime, name: str, **labels: str) -> float:
    value = rt.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _connect(rt: Runtime, client: str = "203.0.113.5", tls: str = "") -> Session:
    session = Session(rt, conn_id="c1")
    assert session.connect(client, "mail.example.net") == CONTINUE
    session.helo("mail.example.net", tls, "TLS_AES_128_GCM_SHA256" if tls else "")
    return session


def _message(session: Session, recipients, headers=HEADERS, body=BODY,
             sender: str = "<sender@example.net>", tls: bool = False,
             queue_id: str = "4QxYz1Abc") -> EomResult:
    assert session.mail(sender, {}) == CONTINUE
    for rcpt in recipients:
        session.rcpt(rcpt, tls=tls)
    for name, value in headers:
        session.header(name, value)
    session.eoh()
    for chunk in body:
        session.body(chunk)
    return session.eom(queue_id)


# What SPF, DKIM and DMARC say of HEADERS from 203.0.113.5 with ZONE's records.
AUTH_VERDICTS = {**DISABLED_VERDICTS, "spf": "PASS", "dkim": "GRAY", "dmarc": "PASS"}
AUTH_HEADERS = (
    ("Received-SPF", "pass (mx.example.com: domain of example.net designates 203.0.113.5 "
                     "as permitted sender) client-ip=203.0.113.5; "
                     'envelope-from="sender@example.net"; helo=mail.example.net;'),
    ("Authentication-Results", "mx.example.com; spf=pass smtp.mailfrom=sender@example.net; "
                               "dkim=none; dmarc=pass (p=reject sp=reject) "
                               "header.from=example.net"),
)


def _listing(rt: Runtime) -> dict[str, list[str]]:
    out = {}
    for state in ("tmp", *STATES):
        path = os.path.join(rt.spool.root, state)
        out[state] = sorted(os.listdir(path)) if os.path.isdir(path) else []
    return out


def test_full_transaction_spools_the_job(runtime, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="mxrules")
    session = _connect(runtime, tls="TLSv1.3")
    result = _message(session, ["<info@example.com>", "<bob+news@example.com>"], tls=True)

    assert result.reply == CONTINUE
    assert is_message_id(result.message_id)
    # No rule scans, yet SPF, DKIM and DMARC ran (SES authenticates every message):
    # their headers first, then the AddHeaders.
    assert result.add_headers == (*AUTH_HEADERS, ("X-Info", "info-rule"), ("X-Everyone", "yes"))
    assert (result.discard, result.delete_recipients) == (True, ())
    assert _listing(runtime)["incoming"] == [result.message_id]
    assert _listing(runtime)["tmp"] == []

    job = runtime.spool.load("incoming", result.message_id)
    assert job.message_id == result.message_id
    assert job.queue_id == "4QxYz1Abc"
    assert job.rule_set == "default"
    assert job.hostname == "mx.example.com"
    assert job.mail_from == "sender@example.net"
    assert job.recipients == ("info@example.com", "bob+news@example.com")
    assert [(m.rule.name, m.recipients) for m in job.rules] == [
        ("info", ("info@example.com",)),
        ("everyone", ("info@example.com", "bob+news@example.com")),
    ]
    assert job.rules[0].rule == runtime.engine.rule_set.rules[0]
    assert job.in_stream_headers == result.add_headers
    assert job.client == Client(address="203.0.113.5", hostname="mail.example.net",
                                helo="mail.example.net", tls_version="TLSv1.3",
                                tls_cipher="TLS_AES_128_GCM_SHA256")
    assert job.verdicts == AUTH_VERDICTS
    assert job.auth_headers == AUTH_HEADERS

    with open(runtime.spool.message_path("incoming", job.message_id), "rb") as fh:
        stored = fh.read()
    assert stored == RAW
    assert (job.message_size, job.message_sha256) == (len(RAW),
                                                      hashlib.sha256(RAW).hexdigest())

    assert _metric(runtime, "mxrules_connections_total", result="accepted") == 1
    assert _metric(runtime, "mxrules_recipients_total", result="accepted") == 2
    assert _metric(runtime, "mxrules_messages_total", result="spooled") == 1
    assert _metric(runtime, "mxrules_received_bytes_total") == len(RAW)
    assert _metric(runtime, "mxrules_received_chunks_total") == 1
    assert _metric(runtime, "mxrules_rule_matches_total", rule="info") == 1
    assert _metric(runtime, "mxrules_rule_matches_total", rule="everyone") == 1
    assert _metric(runtime, "mxrules_spool_commit_seconds_count") == 1
    assert _metric(runtime, "mxrules_spool_write_failures_total") == 0
    assert _metric(runtime, "mxrules_verdicts_total", scanner="spf", status="PASS") == 1
    assert _metric(runtime, "mxrules_verdicts_total", scanner="spam", status="DISABLED") == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("queue_id=4QxYz1Abc" in r.getMessage() and "result=spooled" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize(
    ("delivery", "recipients", "discard", "deleted"),
    [
        pytest.param("consume", ["<info@example.com>"], True, (), id="consume-only-managed"),
        pytest.param("consume", ["<info@example.com>", "<a@secure.example.com>"], True, (),
                     id="consume-managed-and-rejected"),
        pytest.param("consume", ["<info@example.com>", "<x@other.test>", "<bob@example.com>"],
                     False, ("<info@example.com>", "<bob@example.com>"),
                     id="consume-with-unmanaged"),
        pytest.param("deliver", ["<info@example.com>"], False, (), id="deliver-only-managed"),
        pytest.param("deliver", ["<info@example.com>", "<x@other.test>"], False, (),
                     id="deliver-with-unmanaged"),
    ],
)
def test_delivery_modes(tmp_path, delivery: str, recipients: list[str], discard: bool,
                        deleted: tuple[str, ...]) -> None:
    cfg = _config(tmp_path, CONFIG + f"delivery: {delivery}\n")
    rt = Runtime(Engine(cfg), Spool(str(tmp_path / "spool")), MilterMetrics(CollectorRegistry()))
    result = _message(_connect(rt), recipients)
    assert result.reply == CONTINUE
    assert (result.discard, result.delete_recipients) == (discard, deleted)
    assert _listing(rt)["incoming"] == [result.message_id]


@pytest.mark.parametrize(
    "recipients",
    [
        pytest.param(["<x@other.test>"], id="unmanaged"),
        pytest.param(["<x@other.test>", "<a@secure.example.com>"], id="unmanaged-and-rejected"),
        pytest.param(["<a@secure.example.com>"], id="only-rejected"),
    ],
)
def test_message_without_handled_recipients_is_not_spooled(runtime, recipients) -> None:
    result = _message(_connect(runtime), recipients)
    assert result == EomResult(CONTINUE)
    assert not os.path.exists(runtime.spool.root)  # not even created
    assert _metric(runtime, "mxrules_messages_total", result="passed") == 1
    assert _metric(runtime, "mxrules_messages_total", result="spooled") == 0


def test_rcpt_replies(runtime) -> None:
    session = _connect(runtime)
    session.mail("<s@example.net>", {})
    assert session.rcpt("<info@example.com>", tls=False) == CONTINUE
    assert session.rcpt("<x@other.test>", tls=False) == CONTINUE
    assert str(session.rcpt("<a@secure.example.com>", tls=False)) == (
        "530 5.7.0 Must issue a STARTTLS command first")
    assert session.rcpt("<a@secure.example.com>", tls=True) == CONTINUE
    assert str(session.rcpt("<nobody@elsewhere.example.com>", tls=False)) == "250 2.0.0"
    assert str(session.rcpt("<a@secure.example.com>", tls=False)).startswith("530")
    assert _metric(runtime, "mxrules_recipients_total", result="tls-required") == 2
    assert _metric(runtime, "mxrules_rejections_total", stage="rcpt",
                   reason="tls-required") == 2
    assert _metric(runtime, "mxrules_recipients_total", result="unmanaged") == 2


def test_unusable_spool_tempfails_then_recovers(runtime, caplog) -> None:
    os.makedirs(os.path.dirname(runtime.spool.root), exist_ok=True)
    with open(runtime.spool.root, "w") as fh:  # the spool directory replaced by a file
        fh.write("not a directory")
    session = _connect(runtime)
    result = _message(session, ["<info@example.com>"])
    assert result == EomResult(TEMPFAIL_SPOOL)
    assert str(result.reply) == ("451 4.3.0 Temporary failure storing the message, "
                                 "try again later")
    assert result.reply.verb == "tempfail"
    assert _metric(runtime, "mxrules_spool_write_failures_total") == 1
    assert _metric(runtime, "mxrules_messages_total", result="tempfail") == 1
    assert any(r.levelno >= logging.WARNING for r in caplog.records)

    os.unlink(runtime.spool.root)  # the operator mends it; the same connection goes on
    again = _message(session, ["<info@example.com>"])
    assert again.reply == CONTINUE
    assert runtime.spool.ids("incoming") == [again.message_id]
    assert _metric(runtime, "mxrules_spool_write_failures_total") == 1
    assert _metric(runtime, "mxrules_messages_total", result="spooled") == 1


def test_spool_that_breaks_before_commit_tempfails(runtime) -> None:
    session = _connect(runtime)
    session.mail("<s@example.net>", {})
    session.rcpt("<info@example.com>", tls=False)
    session.header("Subject", b"x")
    session.eoh()
    session.body(b"body\r\n")
    incoming = os.path.join(runtime.spool.root, "incoming")
    os.rmdir(incoming)
    with open(incoming, "w") as fh:
        fh.write("not a directory")
    result = session.eom("Q1")
    assert result.reply == TEMPFAIL_SPOOL
    assert _metric(runtime, "mxrules_spool_write_failures_total") == 1
    assert os.listdir(os.path.join(runtime.spool.root, "tmp")) == []


def test_body_over_max_message_size_is_refused(runtime) -> None:
    session = _connect(runtime)
    result = _message(session, ["<info@example.com>"], body=[b"x" * 1000] * 5)
    assert result == EomResult(TOO_BIG)
    assert str(result.reply) == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert _metric(runtime, "mxrules_rejections_total", stage="data", reason="size") == 1
    assert _metric(runtime, "mxrules_messages_total", result="rejected") == 1
    assert _listing(runtime)["tmp"] == [] and _listing(runtime)["incoming"] == []


def test_message_of_exactly_max_message_size_is_accepted(runtime) -> None:
    header = b"Subject:x\r\n\r\n"
    result = _message(_connect(runtime), ["<info@example.com>"], headers=[("Subject", b"x")],
                      body=[b"y" * (4096 - len(header))])
    assert result.reply == CONTINUE
    assert runtime.spool.load("incoming", result.message_id).message_size == 4096


def test_mail_size_over_maximum(runtime) -> None:
    session = _connect(runtime)
    assert session.mail("<s@example.net>", {"SIZE": "4097"}) == TOO_BIG
    assert session.mail("<s@example.net>", {"SIZE": "4096"}) == CONTINUE
    assert session.mail("<s@example.net>", {"SIZE": "junk", "BODY": None}) == CONTINUE
    assert _metric(runtime, "mxrules_rejections_total", stage="mail", reason="size") == 1


@pytest.mark.parametrize(
    "client",
    [
        pytest.param("198.51.100.23", id="ipv4"),
        pytest.param("::ffff:198.51.100.23", id="ipv4-mapped"),
    ],
)
def test_blocked_client(runtime, client: str) -> None:
    session = Session(runtime, "c9")
    reply = session.connect(client, "spammer.example")
    assert str(reply) == "554 5.7.1 Client host [198.51.100.23] blocked by IP address filter"
    assert reply.verb == "reject"
    assert _metric(runtime, "mxrules_connections_total", result="rejected") == 1
    assert _metric(runtime, "mxrules_rejections_total", stage="connect",
                   reason="block-filter") == 1


def test_connection_without_an_ip_address(runtime) -> None:
    session = Session(runtime)
    assert session.connect("localhost", "localhost") == CONTINUE
    assert session.client.address == "localhost"
    assert _metric(runtime, "mxrules_connections_total", result="accepted") == 1


def test_trusted_forwarder_is_recorded(runtime) -> None:
    received = ("Received", b" from h (unknown [203.0.113.9])\n\tby relay (Postfix) id 1")
    result = _message(_connect(runtime, client="192.0.2.250"), ["<info@example.com>"],
                      headers=[received, *HEADERS])
    job = runtime.spool.load("incoming", result.message_id)
    assert (job.client.address, job.client.forwarded_by) == ("203.0.113.9", "192.0.2.250")


BOUNCE_ONLY = """\
hostname: mx.example.com
domains: [example.com]
trusted_forwarders: [192.0.2.250/32]
rule_sets:
  default:
    - name: departed
      enabled: true
      recipients: [bob@example.com]
      actions:
        - bounce: {smtp_reply_code: "550", status_code: 5.1.1, message: Gone,
                   sender: postmaster@example.com}
"""


@pytest.mark.parametrize(
    ("client", "reply", "result"),
    [
        pytest.param("203.0.113.5", "550 5.1.1 Gone", "bounced", id="direct-refused-at-rcpt"),
        pytest.param("192.0.2.250", "250 2.0.0", "accepted", id="forwarder-accepted"),
    ],
)
def test_recipient_that_would_only_be_bounced(tmp_path, client: str, reply: str,
                                              result: str) -> None:
    rt = Runtime(Engine(_config(tmp_path, BOUNCE_ONLY)), Spool(str(tmp_path / "spool")),
                 MilterMetrics(CollectorRegistry()))
    session = _connect(rt, client=client)
    session.mail("<s@example.net>", {})
    assert str(session.rcpt("<bob@example.com>", tls=False)) == reply
    assert _metric(rt, "mxrules_recipients_total", result=result) == 1
    assert _metric(rt, "mxrules_rejections_total", stage="rcpt",
                   reason="bounced") == (result == "bounced")


def test_engine_snapshot_per_message(tmp_path, runtime) -> None:
    session = _connect(runtime)
    session.mail("<s@example.net>", {})
    assert session.rcpt("<info@example.com>", tls=False) == CONTINUE
    old_engine = runtime.engine

    (tmp_path / "new").mkdir()
    new_engine = Engine(_config(tmp_path / "new", """\
        hostname: mx2.example.com
        domains: [example.com]
        delivery: deliver
        max_message_size: 1024
        rule_sets:
          replaced:
            - name: new-rule
              enabled: true
              actions:
                - add_header: {header_name: X-New, header_value: new}
        """))
    runtime.swap(new_engine)
    assert runtime.engine is new_engine

    session.header("Subject", b"x" * 2000)  # too big for the new config, fine for the old
    session.eoh()
    result = session.eom("Q1")
    assert result.reply == CONTINUE
    (spf, _), (ar, ar_value), *added = result.add_headers
    assert (spf, ar, added) == ("Received-SPF", "Authentication-Results",
                                [("X-Info", "info-rule"), ("X-Everyone", "yes")])
    assert ar_value.startswith("mx.example.com; ")  # the old config's name speaks for it
    assert result.discard is True  # the old config consumes
    job = runtime.spool.load("incoming", result.message_id)
    assert (job.rule_set, job.hostname) == ("default", "mx.example.com")
    assert [m.rule for m in job.rules] == list(old_engine.rule_set.rules[:2])

    # The next message is judged by the new config.
    later = _message(session, ["<info@example.com>"], headers=[("Subject", b"y")], body=[])
    assert [n for n, _ in later.add_headers] == ["Received-SPF", "Authentication-Results",
                                                  "X-New"]
    assert later.add_headers[1][1].startswith("mx2.example.com; ")
    assert later.discard is False
    job = runtime.spool.load("incoming", later.message_id)
    assert (job.rule_set, job.hostname) == ("replaced", "mx2.example.com")
    assert [m.rule.name for m in job.rules] == ["new-rule"]


def test_two_messages_on_one_connection(runtime) -> None:
    session = _connect(runtime)
    first = _message(session, ["<info@example.com>"], queue_id="Q1")
    second = _message(session, ["<bob@example.com>"], queue_id="Q2")
    assert first.message_id != second.message_id
    assert runtime.spool.ids("incoming") == sorted([first.message_id, second.message_id])
    assert runtime.spool.load("incoming", second.message_id).queue_id == "Q2"
    assert [m.rule.name for m in runtime.spool.load("incoming", second.message_id).rules] == [
        "everyone"]


def test_abort_mid_message_leaves_nothing(runtime) -> None:
    session = _connect(runtime)
    session.mail("<s@example.net>", {})
    session.rcpt("<info@example.com>", tls=False)
    session.header("Subject", b"x")
    assert len(_listing(runtime)["tmp"]) == 1
    session.abort()
    assert _listing(runtime)["tmp"] == []
    assert session.eom("Q") == EomResult(TEMPFAIL_INTERNAL)


def test_new_mail_from_drops_the_unfinished_message(runtime) -> None:
    session = _connect(runtime)
    session.mail("<s@example.net>", {})
    session.rcpt("<info@example.com>", tls=False)
    session.header("Subject", b"x")
    result = _message(session, ["<bob@example.com>"])
    assert _listing(runtime)["tmp"] == []
    assert runtime.spool.ids("incoming") == [result.message_id]


def test_message_without_header_or_body_callbacks_still_spools(runtime) -> None:
    session = _connect(runtime)
    session.mail("<>", {})
    session.rcpt("<info@example.com>", tls=False)
    result = session.eom("Q")
    assert result.reply == CONTINUE
    job = runtime.spool.load("incoming", result.message_id)
    assert (job.mail_from, job.message_size) == ("", 0)


def test_rcpt_and_eom_before_mail(runtime) -> None:
    session = _connect(runtime)
    assert session.rcpt("<info@example.com>", tls=False) == TEMPFAIL_INTERNAL
    assert session.eom("Q") == EomResult(TEMPFAIL_INTERNAL)


def test_deferred_error_fails_the_message_at_eom(runtime) -> None:
    session = _connect(runtime)
    session.mail("<s@example.net>", {})
    session.rcpt("<info@example.com>", tls=False)
    session.header("Subject", b"x")
    session.deferred_error("body", RuntimeError("boom"))
    session.body(b"more")
    result = session.eom("Q")
    assert result == EomResult(TEMPFAIL_INTERNAL)
    assert _metric(runtime, "mxrules_milter_errors_total", stage="body") == 1
    assert _listing(runtime)["tmp"] == [] and _listing(runtime)["incoming"] == []


def test_error_at_the_edge_tempfails_and_forgets(runtime) -> None:
    session = _connect(runtime)
    session.mail("<s@example.net>", {})
    session.rcpt("<info@example.com>", tls=False)
    session.header("Subject", b"x")
    assert session.error("eoh", ValueError("bad")) == TEMPFAIL_INTERNAL
    assert _metric(runtime, "mxrules_milter_errors_total", stage="eoh") == 1
    assert _listing(runtime)["tmp"] == []


# -- headers only this host may write, and authentication on every message ---------------

OURS = "mx.example.com"


@pytest.mark.parametrize(
    ("incoming", "removed"),
    [
        pytest.param([("Authentication-Results", b" mx.example.com; spf=pass")],
                     [("Authentication-Results", 1)], id="plain-id"),
        pytest.param([("Authentication-Results", b" (x) mx.example.com; spf=pass")],
                     [("Authentication-Results", 1)], id="comment-before-id"),
        pytest.param([("Authentication-Results", b' "mx.example.com"; dkim=pass')],
                     [("Authentication-Results", 1)], id="quoted-id"),
        pytest.param([("authentication-results", b" (a (b)\n\t) MX.Example.COM. 1; none")],
                     [("Authentication-Results", 1)], id="nested-folded-case-dot-version"),
        pytest.param([("Authentication-Results", b" other.example; spf=pass"),
                      ("Authentication-Results", b" (mx.example.com) other.example; spf=pass")],
                     [], id="someone-else-kept"),
        pytest.param([("Authentication-Results", b" mx.example.com; spf=pass"),
                      ("Authentication-Results", b" other.example; spf=none"),
                      ("Authentication-Results", b' "mx.example.com"; dkim=pass')],
                     [("Authentication-Results", 3), ("Authentication-Results", 1)],
                     id="two-forged-around-one-kept-highest-first"),
        pytest.param([("X-SES-Spam-Verdict", b" PASS"), ("x-ses-virus-verdict", b" PASS"),
                      ("X-SES-Spam-Verdict", b" PASS")],
                     [("X-SES-Spam-Verdict", 2), ("X-SES-Spam-Verdict", 1),
                      ("X-SES-Virus-Verdict", 1)], id="ses-verdicts-any-case"),
        pytest.param([("X-SES-RECEIPT", b" AEFBQUFB"), ("Received-SPF", b" pass (forged)")],
                     [], id="receipt-and-received-spf-kept"),
    ],
)
def test_forged_verdict_headers_are_removed_from_both_copies(runtime, incoming, removed) -> None:
    result = _message(_connect(runtime), ["<info@example.com>"], headers=[*incoming, *HEADERS])
    assert result.reply == CONTINUE
    assert list(result.remove_headers) == removed
    with open(runtime.spool.message_path("incoming", result.message_id), "rb") as fh:
        stored = fh.read()
    gone = {(name.lower(), n) for name, n in removed}
    seen: dict[str, int] = {}
    for name, value in incoming:
        seen[name.lower()] = seen.get(name.lower(), 0) + 1
        line = name.encode() + b":" + value.replace(b"\n", b"\r\n") + b"\r\n"
        assert (line in stored) != ((name.lower(), seen[name.lower()]) in gone), line
    # Ours are added, above every incoming header (Postfix inserts them at the top).
    assert [n for n, _ in result.add_headers[:2]] == ["Received-SPF", "Authentication-Results"]
    assert result.add_headers[1][1].startswith(f"{OURS}; spf=pass ")


MODES_CONFIG = """\
hostname: mx.example.com
domains: [example.com]
rule_sets:
  default:
    - {{name: plain, enabled: true, recipients: [plain@example.com]}}
    - {{name: scanned, enabled: true, scan_enabled: true, recipients: [scanned@example.com]}}
scan:
  authentication: {mode}
  on_failure: {on_failure}
  dns: {{nameservers: ['{dns}'], timeout: 2}}
"""
# No spam or virus scanner is configured: a scanning rule gets these.
SPAM_VIRUS_FAILED = {"spam": "PROCESSING_FAILED", "virus": "PROCESSING_FAILED"}
SES_ORDER = ["X-SES-Spam-Verdict", "X-SES-Virus-Verdict", "Received-SPF",
             "Authentication-Results"]


def _modes_runtime(tmp_path, mode: str, on_failure: str = "accept") -> Runtime:
    text = MODES_CONFIG.format(mode=mode, on_failure=on_failure, dns=_DNS.address)
    return Runtime(Engine(_config(tmp_path, text)), Spool(str(tmp_path / "spool")),
                   MilterMetrics(CollectorRegistry()))


@pytest.mark.parametrize(
    ("mode", "rcpt", "verdicts", "headers"),
    [
        pytest.param("always", "plain", AUTH_VERDICTS, SES_ORDER[2:], id="always-unscanned"),
        pytest.param("always", "scanned", {**AUTH_VERDICTS, **SPAM_VIRUS_FAILED}, SES_ORDER,
                     id="always-scanned"),
        pytest.param("scan_enabled", "plain", DISABLED_VERDICTS, [], id="per-rule-unscanned"),
        pytest.param("scan_enabled", "scanned", {**AUTH_VERDICTS, **SPAM_VIRUS_FAILED},
                     SES_ORDER, id="per-rule-scanned"),
        pytest.param("never", "plain", DISABLED_VERDICTS, [], id="never-unscanned"),
        pytest.param("never", "scanned", {**DISABLED_VERDICTS, **SPAM_VIRUS_FAILED},
                     SES_ORDER[:2], id="never-scanned"),
    ],
)
def test_authentication_modes(tmp_path, mode: str, rcpt: str, verdicts: dict[str, str],
                              headers: list[str]) -> None:
    rt = _modes_runtime(tmp_path, mode)
    result = _message(_connect(rt), [f"<{rcpt}@example.com>"])
    assert result.reply == CONTINUE
    assert [n for n, _ in result.add_headers] == headers
    job = rt.spool.load("incoming", result.message_id)
    assert job.verdicts == verdicts
    assert [n for n, _ in job.auth_headers] == [h for h in headers if "SES" not in h]


@pytest.mark.parametrize(
    ("rcpt", "code"),
    [
        pytest.param("plain", "250", id="authentication-alone-goes-on"),
        pytest.param("scanned", "451", id="scanning-rule-tempfails"),
    ],
)
def test_on_failure_tempfail_is_for_scanning_rules_only(tmp_path, rcpt: str, code: str) -> None:
    rt = _modes_runtime(tmp_path, "always", on_failure="tempfail")
    # SPF cannot be looked up: PROCESSING_FAILED, as the scanners that are not configured.
    result = _message(_connect(rt), [f"<{rcpt}@example.com>"], sender="<s@servfail.example>")
    assert (result.reply.code if result.reply != CONTINUE else "250") == code
    if code == "250":
        job = rt.spool.load("incoming", result.message_id)
        assert job.verdicts["spf"] == "PROCESSING_FAILED"
        assert "spf=temperror" in dict(job.auth_headers)["Authentication-Results"]
    else:
        assert rt.spool.ids("incoming") == []


# -- trusted forwarders (docs/ses-compatibility.md): the original client is judged at EOM --

FORWARDER = "192.0.2.250"
FWD_CONFIG = CONFIG.replace(
    "trusted_forwarders: [192.0.2.250/32]",
    "trusted_forwarders: [192.0.2.250/32, 192.0.2.251/32, 198.51.100.250/32]\n"
    "blocklists: [blocklist.txt]",
).replace(
    "  - {name: bad-net, policy: Block, cidr: 198.51.100.0/24}\n",
    "  - {name: bad-net, policy: Block, cidr: 198.51.100.0/24}\n"
    "  - {name: good-host, policy: Allow, cidr: 198.51.100.7}\n"
    "  - {name: bad-v6, policy: Block, cidr: \"2001:db8:bad::/48\"}\n",
)


@pytest.fixture
def fwd_runtime(tmp_path) -> Runtime:
    (tmp_path / "blocklist.txt").write_text("203.0.113.128/25\n")
    return Runtime(Engine(_config(tmp_path, FWD_CONFIG)), Spool(str(tmp_path / "spool")),
                   MilterMetrics(CollectorRegistry()))


def _received(helo: str, rdns: str, ip: str, by: str = "relay.example.com") -> tuple[str, bytes]:
    """A Received header as Postfix writes it (pymilter gives the value a leading space)."""
    return ("Received", f" from {helo} ({rdns} [{ip}])\n\tby {by} (Postfix) with ESMTPS id "
                        f"4Qx1\n\tfor <info@example.com>; Sat, 28 Nov 2026 10:00:00 +0000".encode())


def _forwarded(rt: Runtime, received, recipients=("<info@example.com>",),
               forwarder: str = FORWARDER) -> EomResult:
    session = _connect(rt, client=forwarder)
    return _message(session, list(recipients), headers=[*received, *HEADERS])


def test_forwarder_is_not_filtered_at_connect(fwd_runtime) -> None:
    # 198.51.100.250 is inside the blocked bad-net, but it is one of the user's relays.
    session = Session(fwd_runtime, "c1")
    assert session.connect("198.51.100.250", "relay.example.com") == CONTINUE
    assert session.client.forwarded_by == "198.51.100.250"
    assert _metric(fwd_runtime, "mxrules_connections_total", result="accepted") == 1
    assert _metric(fwd_runtime, "mxrules_rejections_total", stage="connect",
                   reason="block-filter") == 0


@pytest.mark.parametrize(
    ("original", "reason", "text"),
    [
        pytest.param("198.51.100.23", "block-filter", "blocked by IP address filter",
                     id="block-filter"),
        pytest.param("203.0.113.200", "blocklist", "blocked using local blocklist",
                     id="blocklist"),
    ],
)
def test_forwarded_message_from_blocked_original_is_refused_at_eom(
        fwd_runtime, caplog, original: str, reason: str, text: str) -> None:
    caplog.set_level(logging.INFO, logger="mxrules")
    result = _forwarded(fwd_runtime, [_received("spam.example", "unknown", original)])
    assert str(result.reply) == f"554 5.7.1 Client host [{original}] {text}"
    assert result.reply.verb == "reject"
    assert result.message_id == "" and result.add_headers == ()
    assert _listing(fwd_runtime)["tmp"] == [] and _listing(fwd_runtime)["incoming"] == []
    assert _metric(fwd_runtime, "mxrules_connections_total", result="accepted") == 1
    assert _metric(fwd_runtime, "mxrules_connections_total", result="rejected") == 0
    assert _metric(fwd_runtime, "mxrules_rejections_total", stage="data", reason=reason) == 1
    assert _metric(fwd_runtime, "mxrules_messages_total", result="rejected") == 1
    assert _metric(fwd_runtime, "mxrules_messages_total", result="spooled") == 0
    [line] = [r.getMessage() for r in caplog.records if "result=reject" in r.getMessage()]
    assert f"client={original} forwarded_by={FORWARDER} result=reject reason={reason}" in line
    assert "queue_id=4QxYz1Abc" in line


def test_blocked_forwarded_body_is_never_stored(fwd_runtime) -> None:
    session = _connect(fwd_runtime, client=FORWARDER)
    session.mail("<s@example.net>", {})
    session.rcpt("<info@example.com>", tls=False)
    session.header(*_received("spam.example", "unknown", "198.51.100.23"))
    assert len(_listing(fwd_runtime)["tmp"]) == 1  # headers are streamed as they come
    session.eoh()
    session.body(b"x" * 100)
    assert _listing(fwd_runtime)["tmp"] == []  # judged at end of headers: dropped
    assert session.eom("Q").reply.code == "554"


def test_blocked_original_is_refused_for_unmanaged_recipients_too(fwd_runtime) -> None:
    # As a direct connection from that client would be refused whatever its recipients.
    result = _forwarded(fwd_runtime, [_received("spam.example", "unknown", "198.51.100.23")],
                        recipients=["<x@other.test>"])
    assert result.reply.code == "554"
    assert _metric(fwd_runtime, "mxrules_messages_total", result="passed") == 0


def test_forwarded_allow_filter_wins(fwd_runtime) -> None:
    result = _forwarded(fwd_runtime, [_received("good.example", "mail.good.example",
                                                "198.51.100.7")])
    assert result.reply == CONTINUE
    job = fwd_runtime.spool.load("incoming", result.message_id)
    assert job.client == Client(address="198.51.100.7", hostname="mail.good.example",
                                helo="good.example", forwarded_by=FORWARDER)


def test_forwarded_allowed_original_is_recorded_with_the_message(fwd_runtime, caplog) -> None:
    caplog.set_level(logging.INFO, logger="mxrules")
    session = _connect(fwd_runtime, client=FORWARDER, tls="TLSv1.3")
    result = _message(session, ["<info@example.com>"],
                      headers=[_received("sender.example", "unknown", "203.0.113.9"), *HEADERS])
    assert result.reply == CONTINUE
    job = fwd_runtime.spool.load("incoming", result.message_id)
    # The forwarder's hop is the only TLS mxrules saw; the rest is the original client's.
    assert job.client == Client("203.0.113.9", "unknown", "sender.example", "TLSv1.3",
                                "TLS_AES_128_GCM_SHA256", FORWARDER)
    with open(fwd_runtime.spool.message_path("incoming", job.message_id), "rb") as fh:
        assert fh.read().startswith(b"Received: from sender.example (unknown [203.0.113.9])\r\n")
    assert any(f"client=203.0.113.9 forwarded_by={FORWARDER}" in r.getMessage()
               and "result=spooled" in r.getMessage() for r in caplog.records)
    # The connection itself stays the forwarder's.
    assert session.client.address == FORWARDER


@pytest.mark.parametrize(
    ("received", "reason"),
    [
        pytest.param([("Received", b" by relay.example.com (Postfix, from userid 0) id 4Qx1; "
                                   b"Sat, 28 Nov 2026 10:00:00 +0000")],
                     "unparsable-received", id="local-submission"),
        pytest.param([("Received", b" (qmail 1234 invoked from network); 28 Nov 2026")],
                     "unparsable-received", id="unknown-form"),
        pytest.param([("Received", b" from sender.example by relay.example.com")],
                     "unparsable-received", id="no-address"),
        # A relay that takes any HELO (Sendmail's AllowBogusHELO): the client's
        # `x (r [203.0.113.9]) by y` reads as a one-line from clause of its own.
        pytest.param([("Received", b" from x (r [203.0.113.9]) by y (unknown [198.51.100.23])"
                                   b"\n\tby relay.example.com (8.17.1/8.17.1) id 4Qx1")],
                     "ambiguous-received", id="helo-mimics-another-form"),
        pytest.param([], "no-received", id="no-received-header"),
        pytest.param([_received("relay2", "relay2", "192.0.2.251")], "only-trusted-hops",
                     id="only-trusted-hops"),
        pytest.param([_received("relay2", "relay2", "192.0.2.251")] * 20, "too-many-hops",
                     id="too-many-hops"),
    ],
)
@pytest.mark.parametrize("policy", ["tempfail", "reject"])
def test_forwarded_without_original_client_is_never_judged_as_the_forwarder(
        tmp_path, caplog, received, reason: str, policy: str) -> None:
    """Not accepted as the forwarder (which the IP filters would pass): 451 or 554."""
    (tmp_path / "blocklist.txt").write_text("")
    text = FWD_CONFIG + ("forwarder_unresolved: reject\n" if policy == "reject" else "")
    rt = Runtime(Engine(_config(tmp_path, text)), Spool(str(tmp_path / "spool")),
                 MilterMetrics(CollectorRegistry()))
    caplog.set_level(logging.INFO, logger="mxrules")
    session = _connect(rt, client=FORWARDER)
    session.mail("<s@example.net>", {})
    session.rcpt("<info@example.com>", tls=False)
    for name, value in [*received, *HEADERS]:
        session.header(name, value)
    session.eoh()
    session.body(b"x" * 100)
    assert _listing(rt)["tmp"] == []  # judged at end of headers: nothing is stored
    result = session.eom("4QxYz1Abc")
    expected = {"tempfail": "451 4.7.1 Original client of forwarded message unknown, try again "
                            "later",
                "reject": "554 5.7.1 Original client of forwarded message unknown"}[policy]
    assert (result.reply.verb, str(result.reply)) == (policy, expected)
    assert result.message_id == "" and result.add_headers == ()
    assert _listing(rt)["incoming"] == [] and _listing(rt)["tmp"] == []
    assert _metric(rt, "mxrules_forwarded_unresolved_total", reason=reason) == 1
    assert _metric(rt, "mxrules_messages_total",
                   result="rejected" if policy == "reject" else "tempfail") == 1
    assert _metric(rt, "mxrules_messages_total", result="spooled") == 0
    assert _metric(rt, "mxrules_rejections_total", stage="data",
                   reason="unresolved-client") == (1 if policy == "reject" else 0)
    [record] = [r for r in caplog.records if r.getMessage().startswith("forwarded")]
    assert record.levelno == logging.WARNING
    line = record.getMessage()
    assert f"forwarder={FORWARDER} result={policy} reason={reason}" in line
    assert "queue_id=4QxYz1Abc" in line and expected in line


def test_unparsable_hop_ends_the_walk(fwd_runtime) -> None:
    # Who wrote the header below an unparsable one is unknown: it is not believed.
    result = _forwarded(fwd_runtime, [
        ("Received", b" by relay.example.com (Postfix, from userid 0)"),
        _received("good.example", "unknown", "203.0.113.9"),
    ])
    assert result.reply.code == "451"
    assert _listing(fwd_runtime)["incoming"] == []


def test_the_whole_received_header_is_read(fwd_runtime) -> None:
    """A HELO longer than any prefix: the address after it is still found and judged."""
    helo = "A" * 1100
    assert _forwarded(fwd_runtime, [_received(helo, "unknown", "198.51.100.23")]).reply.code \
        == "554"
    allowed = _forwarded(fwd_runtime, [_received(helo, "unknown", "203.0.113.9")])
    assert allowed.reply == CONTINUE
    job = fwd_runtime.spool.load("incoming", allowed.message_id)
    assert (job.client.address, job.client.helo) == ("203.0.113.9", helo)


@pytest.mark.parametrize(
    ("literal", "address", "blocked"),
    [
        pytest.param("IPv6:2001:db8:bad::5", "2001:db8:bad::5", True, id="blocked"),
        pytest.param("IPv6:2001:db8:1::5", "2001:db8:1::5", False, id="allowed"),
        pytest.param("IPv6:::ffff:198.51.100.23", "198.51.100.23", True, id="ipv4-mapped"),
    ],
)
def test_forwarded_ipv6_original(fwd_runtime, literal: str, address: str,
                                 blocked: bool) -> None:
    result = _forwarded(fwd_runtime, [_received("v6.example", "unknown", literal)])
    if blocked:
        assert result.reply.code == "554"
        assert f"[{address}]" in result.reply.text
    else:
        assert result.reply == CONTINUE
        job = fwd_runtime.spool.load("incoming", result.message_id)
        assert (job.client.address, job.client.forwarded_by) == (address, FORWARDER)


@pytest.mark.parametrize(
    ("original", "code"),
    [pytest.param("203.0.113.9", "250", id="allowed"),
     pytest.param("198.51.100.23", "554", id="blocked")],
)
def test_received_chain_through_two_trusted_hops(fwd_runtime, original: str, code: str) -> None:
    result = _forwarded(fwd_runtime, [
        # Written by the forwarder: it got the mail from another relay of the user's...
        _received("relay2.example.com", "relay2.example.com", "192.0.2.251"),
        # ...which re-injected it to itself after a content filter...
        _received("localhost", "localhost", "127.0.0.1", by="relay2.example.com"),
        # ...after receiving it from the original client.
        _received("sender.example", "unknown", original, by="relay2.example.com"),
        # Written by the original client (or anyone before it): never believed.
        _received("x", "x", "198.51.100.99", by="sender.example"),
    ])
    assert result.reply.code == code
    if code == "250":
        job = fwd_runtime.spool.load("incoming", result.message_id)
        assert (job.client.address, job.client.forwarded_by) == (original, FORWARDER)


def test_each_message_on_a_forwarded_connection_is_judged_alone(fwd_runtime) -> None:
    session = _connect(fwd_runtime, client=FORWARDER)
    blocked = _message(session, ["<info@example.com>"],
                       headers=[_received("a", "unknown", "198.51.100.23"), *HEADERS])
    allowed = _message(session, ["<info@example.com>"],
                       headers=[_received("b", "unknown", "203.0.113.9"), *HEADERS])
    unknown = _message(session, ["<info@example.com>"])
    assert (blocked.reply.code, allowed.reply, unknown.reply.code) == ("554", CONTINUE, "451")
    addresses = [fwd_runtime.spool.load("incoming", m).client.address
                 for m in fwd_runtime.spool.ids("incoming")]
    assert addresses == ["203.0.113.9"]


def test_non_forwarded_client_is_filtered_at_connect_as_before(fwd_runtime) -> None:
    session = Session(fwd_runtime, "c2")
    reply = session.connect("198.51.100.23", "spammer.example")
    assert str(reply) == "554 5.7.1 Client host [198.51.100.23] blocked by IP address filter"
    assert _metric(fwd_runtime, "mxrules_connections_total", result="rejected") == 1
    assert _metric(fwd_runtime, "mxrules_rejections_total", stage="connect",
                   reason="block-filter") == 1
    # An allowed direct client's Received headers decide nothing: only a forwarder's count.
    result = _forwarded(fwd_runtime, [_received("x", "unknown", "198.51.100.23")],
                        forwarder="203.0.113.5")
    assert result.reply == CONTINUE
    job = fwd_runtime.spool.load("incoming", result.message_id)
    assert (job.client.address, job.client.forwarded_by) == ("203.0.113.5", "")


# -- SES's action size limits, judged during SMTP ------------------------------------

SNS_CONFIG = """\
hostname: mx.example.com
domains: [example.com]
max_message_size: 1048576
rule_sets:
  default:
    - name: publish
      enabled: true
      recipients: [sns@example.com]
      actions: [{sns: {topic_arn: "arn:aws:sns:us-east-1:123456789012:t"}}]
    - name: call
      enabled: true
      recipients: [call@example.com]
      actions: [{lambda: {function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f"}}]
"""
SNS_LIMIT = 150 * 1024


@pytest.fixture
def sns_runtime(tmp_path) -> Runtime:
    return Runtime(Engine(_config(tmp_path, SNS_CONFIG)), Spool(str(tmp_path / "spool")),
                   MilterMetrics(CollectorRegistry()))


def _floor(session: Session, rcpt: str = "sns@example.com") -> int:
    return payload.prefix_floor("s@example.net", session.client, "mx.example.com", rcpt)


def test_size_at_rcpt_counts_the_headers_ses_adds(sns_runtime) -> None:
    session = _connect(sns_runtime)
    fits = SNS_LIMIT - _floor(session)
    assert session.mail("<s@example.net>", {"SIZE": str(fits)}) == CONTINUE
    assert session.rcpt("<sns@example.com>", tls=False) == CONTINUE
    session = _connect(sns_runtime)
    assert session.mail("<s@example.net>", {"SIZE": str(fits + 1)}) == CONTINUE
    reply = session.rcpt("<sns@example.com>", tls=False)
    assert str(reply) == ("550 5.3.4 <sns@example.com>: Recipient address rejected: message "
                          f"size exceeds the limit of {SNS_LIMIT} bytes")
    assert session.rcpt("<call@example.com>", tls=False) == CONTINUE
    assert _metric(sns_runtime, "mxrules_recipients_total", result="too-big") == 1
    assert _metric(sns_runtime, "mxrules_rejections_total", stage="rcpt", reason="too-big") == 1


def _big(session: Session, recipients: list[str], size: int) -> EomResult:
    head = b"Subject:x\r\n\r\n"
    return _message(session, recipients, headers=[("Subject", b"x")],
                    body=[b"y" * (size - len(head))], sender="<s@example.net>")


def test_end_of_data_refuses_what_every_rule_would_bounce(sns_runtime) -> None:
    # At end of data the prefix is known whole: the floor, plus the Received-SPF and
    # Authentication-Results of the check every message gets (same for these messages).
    probe = _big(_connect(sns_runtime), ["<sns@example.com>"], 1000)
    job = sns_runtime.spool.load("incoming", probe.message_id)
    prefix = len(payload.stored_copy_prefix(job))
    assert prefix > _floor(_connect(sns_runtime)) + 200  # the authentication headers count
    fits = SNS_LIMIT - prefix
    assert _big(_connect(sns_runtime), ["<sns@example.com>"], fits).reply == CONTINUE
    result = _big(_connect(sns_runtime), ["<sns@example.com>"], fits + 1)
    assert result == EomResult(TOO_BIG_FOR_ACTIONS)
    assert _metric(sns_runtime, "mxrules_rejections_total", stage="data", reason="too-big") == 1
    assert _listing(sns_runtime)["tmp"] == [] and len(_listing(sns_runtime)["incoming"]) == 2
    # Another recipient's rule takes it: spooled, the SNS action bounces it later.
    mixed = _big(_connect(sns_runtime), ["<sns@example.com>", "<call@example.com>"], fits + 1)
    assert mixed.reply == CONTINUE
    unmanaged = _big(_connect(sns_runtime), ["<sns@example.com>", "<x@elsewhere.test>"],
                     fits + 1)
    assert unmanaged.reply == CONTINUE
