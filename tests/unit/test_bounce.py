"""The Bounce action: the RFC 3464 DSN it builds, and its hand-off to a real SMTP server.

build_dsn is pure, so the structure and every hostile input are checked by
parsing the bytes back with the email package.  send_dsn and run talk to real
aiosmtpd servers on loopback (the harness sink, or a handler that rejects),
never to a mock: the envelope (`MAIL FROM:<>`) is what matters and only a
server sees it.
"""

from __future__ import annotations

import email
import email.policy
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiosmtpd.controller import Controller
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.jobs import make_job
from harness.ports import free_port
from harness.sink import SmtpSink
from mxrules.actions.base import ActionContext, Outcome, PermanentActionError
from mxrules.actions.bounce import (
    HEADER_LIMIT,
    RelayError,
    parse_relay,
    run,
    send_dsn,
    too_big,
)
from mxrules.actions.bounce_limit import BounceLimiter
from mxrules.actions.dsn import HEADERS_BUDGET, MAX_DSN, _cut_headers, build_dsn
from mxrules.config import WorkerSettings
from mxrules.headblock import whole_header_lines
from mxrules.rules import Action, BounceAction, Rule, S3Action, SNSAction
from mxrules.spool import Client, Job, MatchedRule

NOW = datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
SENDER = "sender@example.net"
RCPT = "bob@example.com"
ACTION = BounceAction(smtp_reply_code="550", status_code="5.1.1",
                      message="Mailbox does not exist", sender="mailer-daemon@example.com")
HEADERS = (b"Received: from mail.example.net (mail.example.net [192.0.2.1])\r\n"
           b"\tby mx.example.com (Postfix) with ESMTP id 4Xk2Lq0F3Zz1\r\n"
           b"From: Sender <sender@example.net>\r\n"
           b"To: bob@example.com\r\n"
           b"Subject: hello\r\n"
           b"Message-ID: <1@example.net>\r\n")
BODY = b"SECRET BODY LINE\r\n" * 3
TOP_HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted",
               "MIME-Version", "Content-Type"]
PART_TYPES = ["text/plain", "message/delivery-status", "text/rfc822-headers"]
# aiosmtpd records `MAIL FROM:<>` as "<>" (any other sender loses its brackets).
NULL_SENDER = "<>"
RCPT_FIELDS = ["Final-Recipient", "Action", "Status", "Diagnostic-Code"]


def _job(**changes: Any) -> Job:
    fields: dict[str, Any] = dict(
        mail_from=SENDER,
        recipients=(RCPT,),
        client=Client(address="192.0.2.1", hostname="mail.example.net", helo="mail"),
        rules=(MatchedRule(Rule(name="departed", enabled=True, actions=(ACTION,)), (RCPT,)),),
        verdicts={"spam": "PASS", "virus": "PASS", "spf": "PASS", "dkim": "GRAY",
                  "dmarc": "GRAY"},
    )
    fields.update(changes)
    return make_job(HEADERS + b"\r\n" + BODY, **fields)


def _action(**changes: Any) -> BounceAction:
    fields: dict[str, Any] = dict(ACTION.to_config()["bounce"])
    fields.update(changes)
    return BounceAction(**fields)


def _parse(dsn: bytes) -> EmailMessage:
    return email.message_from_bytes(dsn, policy=email.policy.default)


def _parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return cast(list[EmailMessage], payload)


def _report_blocks(msg: EmailMessage) -> list[EmailMessage]:
    """The message/delivery-status part as the email package sees it: one Message per block."""
    blocks = _parts(msg)[1].get_payload()
    assert isinstance(blocks, list)
    return cast(list[EmailMessage], blocks)


def _text(part: EmailMessage) -> str:
    """A text part's decoded content with LF line ends (the parser keeps the CRLFs)."""
    return str(part.get_content()).replace("\r\n", "\n")


def _unfold(value: str) -> str:
    return " ".join(str(value).split())


def _assert_well_formed(dsn: bytes, n_recipients: int) -> EmailMessage:
    """What every DSN must be, whatever went in: checked on the bytes and on the parse."""
    assert dsn.endswith(b"\r\n")
    for line in dsn[:-2].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line, line[:80]
        assert len(line) <= 998
    head, _, body = dsn.partition(b"\r\n\r\n")
    assert body.isascii()  # every part is 7bit or quoted-printable
    # Header lines: a known name, or a folded continuation (starts with white space).
    names = [line.split(b":", 1)[0].decode() for line in head.split(b"\r\n")
             if not line[:1].isspace()]
    assert names == TOP_HEADERS

    msg = _parse(dsn)
    assert list(msg.keys()) == TOP_HEADERS
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    for part in msg.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    assert [p.get_content_type() for p in _parts(msg)] == PART_TYPES
    blocks = _report_blocks(msg)
    assert len(blocks) == 1 + n_recipients
    assert set(blocks[0].keys()) <= {"Reporting-MTA", "Arrival-Date"}
    assert blocks[0]["Reporting-MTA"].startswith("dns; ")
    for block in blocks[1:]:
        assert list(block.keys()) == RCPT_FIELDS
        assert block["Action"] == "failed"
    return msg


# -- structure ---------------------------------------------------------------------


def test_dsn_structure_and_top_level_headers() -> None:
    dsn = build_dsn(_job(), ACTION, [RCPT], HEADERS, now=NOW)

    msg = _assert_well_formed(dsn, 1)
    assert dsn.isascii()
    assert msg["From"] == "mailer-daemon@example.com"
    assert msg["To"] == SENDER
    assert msg["Subject"] == "Delivery Status Notification (Failure)"
    assert parsedate_to_datetime(msg["Date"]) == NOW
    assert re.fullmatch(r"<[A-Za-z0-9.]+@mx\.example\.com>", msg["Message-ID"])
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"


def test_per_message_and_per_recipient_fields_exactly() -> None:
    rcpts = [RCPT, "carol@example.com"]
    msg = _assert_well_formed(build_dsn(_job(), ACTION, rcpts, HEADERS, now=NOW), 2)

    per_message, *per_rcpt = _report_blocks(msg)
    assert list(per_message.items()) == [
        ("Reporting-MTA", "dns; mx.example.com"),
        ("Arrival-Date", "Thu, 01 Jan 2026 00:00:00 +0000"),
    ]
    assert [list(block.items()) for block in per_rcpt] == [
        [("Final-Recipient", f"rfc822; {rcpt}"),
         ("Action", "failed"),
         ("Status", "5.1.1"),
         ("Diagnostic-Code", "smtp; 550 5.1.1 Mailbox does not exist")]
        for rcpt in rcpts
    ]


def test_repeated_recipient_gets_one_block() -> None:
    msg = _assert_well_formed(build_dsn(_job(), ACTION, [RCPT, RCPT], HEADERS, now=NOW), 1)
    assert _report_blocks(msg)[1]["Final-Recipient"] == f"rfc822; {RCPT}"


@pytest.mark.parametrize(
    ("reply", "status", "expected"),
    [
        pytest.param("550", None, "5.0.0", id="5xx-none"),
        pytest.param("554", "", "5.0.0", id="5xx-empty"),
        pytest.param("450", None, "4.0.0", id="4xx-none"),
        pytest.param("451", "", "4.0.0", id="4xx-empty"),
        pytest.param("552", "5.3.4", "5.3.4", id="given"),
        pytest.param("550", "5.1.1\r\nBcc: x@y", "5.0.0", id="injected-status-ignored"),
    ],
)
def test_status_code_given_or_derived(reply: str, status: str | None, expected: str) -> None:
    action = _action(smtp_reply_code=reply, status_code=status)
    msg = _assert_well_formed(build_dsn(_job(), action, [RCPT], HEADERS, now=NOW), 1)

    block = _report_blocks(msg)[1]
    assert block["Status"] == expected
    assert block["Diagnostic-Code"] == f"smtp; {reply} {expected} Mailbox does not exist"


def test_human_part_has_message_and_recipients() -> None:
    rcpts = [RCPT, "carol@example.com"]
    msg = _parse(build_dsn(_job(), ACTION, rcpts, HEADERS, now=NOW))

    text = _text(_parts(msg)[0])
    assert text.startswith("Mailbox does not exist\n")
    for rcpt in rcpts:
        assert f"    {rcpt}\n" in text
    assert "550 5.1.1" in text


def test_original_headers_attached_and_no_body() -> None:
    dsn = build_dsn(_job(), ACTION, [RCPT], HEADERS, now=NOW)

    attached = _parts(_parse(dsn))[2]
    assert attached["Content-Transfer-Encoding"] == "7bit"
    assert attached.get_payload(decode=True) == HEADERS
    assert b"SECRET BODY" not in dsn


# -- hostile input -----------------------------------------------------------------

INJECT = "\r\nBcc: victim@example.org\r\nX-Injected: 1"


@pytest.mark.parametrize(
    ("job_changes", "action_changes", "rcpts"),
    [
        pytest.param({"mail_from": f"evil@example.net{INJECT}"}, {}, [RCPT], id="mail-from-crlf"),
        pytest.param({}, {"sender": f"md@example.com{INJECT}"}, [RCPT], id="sender-crlf"),
        pytest.param({}, {"message": f"no such user{INJECT}"}, [RCPT], id="message-crlf"),
        pytest.param({}, {}, [f"x@example.com{INJECT}", RCPT], id="recipient-crlf"),
        pytest.param({"hostname": f"mx.example.com{INJECT}"}, {}, [RCPT], id="hostname-crlf"),
        pytest.param({"received_at": f"yesterday{INJECT}"}, {}, [RCPT], id="received-at-junk"),
        pytest.param({}, {"smtp_reply_code": f"550{INJECT}"}, [RCPT], id="reply-code-crlf"),
        pytest.param({"mail_from": "a\udcff@example.net"}, {"message": "b\udcfe"},
                     ["c\udcfd@example.com"], id="lone-surrogates"),
        pytest.param({"mail_from": "\x00@\x7f"}, {"sender": "\x1b[31m@x"}, ["\x00"], id="controls"),
    ],
)
def test_injection_never_reaches_a_header(job_changes: dict[str, Any],
                                          action_changes: dict[str, Any],
                                          rcpts: list[str]) -> None:
    dsn = build_dsn(_job(**job_changes), _action(**action_changes), rcpts, HEADERS, now=NOW)

    msg = _assert_well_formed(dsn, len(rcpts))
    assert b"\r\nBcc:" not in dsn and b"\r\nX-Injected:" not in dsn
    assert all(not p.get_all("Bcc") and not p.get_all("X-Injected") for p in msg.walk())


def test_unwritable_addresses_fall_back_safely() -> None:
    job = _job(mail_from=f"evil@example.net{INJECT}", hostname=f"mx.example.com{INJECT}")
    action = _action(sender=f"md@example.com{INJECT}")
    msg = _parse(build_dsn(job, action, [f"x@example.com{INJECT}"], HEADERS, now=NOW))

    assert msg["To"] == "undisclosed-recipients:;"
    assert msg["From"] == "MAILER-DAEMON@mx.example.comBccvictimexample.orgX-Injected1"
    per_message, block = _report_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; mx.example.comBccvictimexample.orgX-Injected1"
    assert block["Final-Recipient"] == (
        r"utf-8; x@example.com\x{0D}\x{0A}Bcc:\x{20}victim@example.org"
        r"\x{0D}\x{0A}X-Injected:\x{20}1")


def test_message_with_line_breaks_stays_one_field() -> None:
    action = _action(message=f"no such user{INJECT}")
    block = _report_blocks(_parse(build_dsn(_job(), action, [RCPT], HEADERS, now=NOW)))[1]
    assert _unfold(block["Diagnostic-Code"]) == (
        "smtp; 550 5.1.1 no such user Bcc: victim@example.org X-Injected: 1")


@pytest.mark.parametrize(
    ("mail_from", "to_header"),
    [
        pytest.param('"john doe"@example.net', '"john doe"@example.net', id="already-quoted"),
        pytest.param("john doe@example.net", '"john doe"@example.net', id="needs-quotes"),
        pytest.param('a"b@example.net', '"a\\"b"@example.net', id="quote-escaped"),
        pytest.param("a,b;c@example.net", '"a,b;c"@example.net', id="specials"),
        pytest.param("user@[192.0.2.7]", "user@[192.0.2.7]", id="domain-literal"),
        pytest.param("postmaster", "undisclosed-recipients:;", id="no-domain"),
        pytest.param("user@exa mple.net", "undisclosed-recipients:;", id="bad-domain"),
    ],
)
def test_odd_envelope_senders_in_to(mail_from: str, to_header: str) -> None:
    dsn = build_dsn(_job(mail_from=mail_from), ACTION, [RCPT], HEADERS, now=NOW)
    msg = _assert_well_formed(dsn, 1)
    assert f"\r\nTo: {to_header}\r\n".encode() in dsn
    assert msg["To"].defects == ()  # a parsed address, not a best-effort guess


def test_utf8_addresses() -> None:
    job = _job(mail_from="jörg@exämple.de")
    dsn = build_dsn(job, _action(sender="postmaster@exämple.com"), ["zoë@example.com"],
                    HEADERS, now=NOW)

    msg = _assert_well_formed(dsn, 1)
    assert not dsn.isascii()  # RFC 6532 From/To: send_dsn must ask for SMTPUTF8
    assert msg["To"] == "jörg@exämple.de"
    assert msg["From"] == "postmaster@exämple.com"
    block = _report_blocks(msg)[1]
    assert block["Final-Recipient"] == r"utf-8; zo\x{EB}@example.com"
    text = _parts(msg)[0]
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "    zoë@example.com\n" in _text(text)


def test_garbage_original_headers_are_quoted_printable_and_intact() -> None:
    boundary_like = b"--mxrules-dsn-" + b"0" * 32 + b"--"
    original = (b"Subject: caf\xe9 \xff\xfe\x00 nul\r\n"
                b"X-Bare-CR: a\rb\r\n"
                b"X-Bare-LF: c\n"
                + boundary_like + b"\r\n"
                b"X-Long: " + b"y" * 3000 + b"\r\n"
                b"X-Trailing-Space: z \r\n")
    dsn = build_dsn(_job(), ACTION, [RCPT], original, now=NOW)

    msg = _assert_well_formed(dsn, 1)
    attached = _parts(msg)[2]
    assert attached["Content-Transfer-Encoding"] == "quoted-printable"
    assert attached.get_payload(decode=True) == original.replace(b"c\n", b"c\r\n")


def test_long_message_is_folded_within_line_limits() -> None:
    words = " ".join(["word"] * 400)
    blob = "x" * 2048
    for message in (words, blob):
        dsn = build_dsn(_job(), _action(message=message), [RCPT], HEADERS, now=NOW)
        msg = _assert_well_formed(dsn, 1)
        diagnostic = _report_blocks(msg)[1]["Diagnostic-Code"]
        assert _unfold(diagnostic).replace(" ", "") == "smtp;5505.1.1" + message.replace(" ", "")


def test_non_ascii_message() -> None:
    msg = _parse(build_dsn(_job(), _action(message="Boîte pleine ✉"), [RCPT], HEADERS, now=NOW))
    assert _report_blocks(msg)[1]["Diagnostic-Code"] == (
        r"smtp; 550 5.1.1 Bo\x{EE}te pleine \x{2709}")
    assert _text(_parts(msg)[0]).startswith("Boîte pleine ✉\n")


_junk = st.text(st.characters(blacklist_categories=["Cs"]) | st.sampled_from("\r\n\x00\udcff"),
                max_size=60)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mail_from=_junk, sender=_junk, message=_junk, hostname=_junk, reply=_junk,
       status=_junk, rcpts=st.lists(_junk, min_size=1, max_size=3),
       original=st.binary(max_size=300))
def test_any_input_gives_a_well_formed_dsn(mail_from: str, sender: str, message: str,
                                           hostname: str, reply: str, status: str,
                                           rcpts: list[str], original: bytes) -> None:
    job = _job(mail_from=mail_from, hostname=hostname)
    action = _action(sender=sender, message=message, smtp_reply_code=reply, status_code=status)
    _assert_well_formed(build_dsn(job, action, rcpts, original, now=NOW),
                        len(dict.fromkeys(rcpts)))


# -- the size cap ------------------------------------------------------------------

# What a client sent in the attack: 900 recipients and some 40 KB of its own headers.
ATTACK_RCPTS = [f"user{i:04d}@example.com" for i in range(900)]
ATTACK_HEADERS = HEADERS + b"".join(b"X-Junk-%03d: " % i + b"j" * 990 + b"\r\n"
                                    for i in range(40))
WIDE = "\u2709" * 2048  # the longest message, every character escaped in both parts


def _listed(msg: EmailMessage) -> list[str]:
    return [b["Final-Recipient"].removeprefix("rfc822; ") for b in _report_blocks(msg)[1:]]


@pytest.mark.parametrize(
    ("rcpts", "headers", "message", "rcpts_cut", "headers_cut"),
    [
        pytest.param([RCPT], HEADERS, ACTION.message, False, False, id="small-nothing-cut"),
        pytest.param(ATTACK_RCPTS, ATTACK_HEADERS, ACTION.message, True, True,
                     id="900-recipients-40k-headers"),
        pytest.param(ATTACK_RCPTS[:20], ATTACK_HEADERS, ACTION.message, False, True,
                     id="only-headers-cut"),
        pytest.param(ATTACK_RCPTS, HEADERS, ACTION.message, True, False,
                     id="only-recipients-cut"),
        pytest.param([f"\u00e9{'x' * 800}{i}@example.com" for i in range(900)],
                     b"X-8bit: \xff\xfe=\x00\r\n" * 5000, WIDE, True, True,
                     id="worst-case-escaping"),
    ],
)
def test_dsn_is_capped_and_says_what_was_cut(rcpts: list[str], headers: bytes, message: str,
                                             rcpts_cut: bool, headers_cut: bool) -> None:
    dsn = build_dsn(_job(), _action(message=message), rcpts, headers, now=NOW)

    assert len(dsn) <= MAX_DSN
    msg = _parse(dsn)
    listed = _listed(msg) if rcpts[0].isascii() else rcpts[:len(_report_blocks(msg)) - 1]
    _assert_well_formed(dsn, len(listed))
    assert listed == rcpts[:len(listed)] and listed  # the first ones, at least one
    human = _text(_parts(msg)[0])
    assert (len(listed) < len(rcpts)) is rcpts_cut
    assert (f"... and {len(rcpts) - len(listed)} more: the list was cut" in human) is rcpts_cut
    attached = _parts(msg)[2].get_payload(decode=True)
    assert isinstance(attached, bytes) and headers.startswith(attached)
    assert (attached != headers) is headers_cut
    assert ("the headers were cut" in _unfold(human)) is headers_cut
    if headers_cut and attached:
        assert attached.endswith(b"\r\n")  # whole fields only


def test_attack_dsn_keeps_the_useful_part() -> None:
    msg = _parse(build_dsn(_job(), ACTION, ATTACK_RCPTS, ATTACK_HEADERS, now=NOW))
    assert len(_listed(msg)) >= 100
    attached = _parts(msg)[2].get_payload(decode=True)
    assert isinstance(attached, bytes) and attached.startswith(HEADERS)
    assert len(attached) <= HEADERS_BUDGET


FIELDS = b"A: 1\r\nB: 2\r\n\t3\r\n 4\r\nC: 5\r\n"


@pytest.mark.parametrize(
    ("budget", "expected", "cut"),
    [
        pytest.param(100, FIELDS, False, id="all-fit"),
        pytest.param(len(FIELDS), FIELDS, False, id="exactly"),
        pytest.param(len(FIELDS) - 1, b"A: 1\r\nB: 2\r\n\t3\r\n 4\r\n", True,
                     id="last-field-out"),
        pytest.param(12, b"A: 1\r\n", True, id="folded-field-out-whole"),
        pytest.param(17, b"A: 1\r\n", True, id="not-half-a-folded-field"),
        pytest.param(3, b"", True, id="nothing-fits"),
    ],
)
def test_headers_are_cut_at_whole_fields(budget: int, expected: bytes, cut: bool) -> None:
    assert _cut_headers(FIELDS, budget) == (expected, cut)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count=st.integers(1, 1000), length=st.integers(1, 900), message=_junk,
       header_size=st.integers(0, HEADER_LIMIT), wide=st.booleans())
def test_no_input_makes_a_dsn_over_the_cap(count: int, length: int, message: str,
                                           header_size: int, wide: bool) -> None:
    char = "\u00e9" if wide else "a"
    rcpts = [f"{char * length}{i}@example.com" for i in range(count)]
    headers = (b"X-H: \xff=" + b"h" * 90 + b"\r\n") * (header_size // 100)
    action = _action(message=(WIDE if wide else "") + message)
    dsn = build_dsn(_job(), action, rcpts, headers, now=NOW)
    assert len(dsn) <= MAX_DSN
    assert len(_report_blocks(_parse(dsn))) >= 2  # a recipient is always listed


# -- reading the header block ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(HEADERS + b"\r\n" + BODY, HEADERS, id="crlf"),
        pytest.param(b"A: 1\nB: 2\n\nbody\n", b"A: 1\nB: 2\n", id="bare-lf"),
        pytest.param(HEADERS, HEADERS, id="no-body"),
        pytest.param(b"\r\nbody only\r\n", b"", id="no-headers"),
        pytest.param(b"", b"", id="empty-file"),
    ],
)
def test_read_header_block(tmp_path: Path, raw: bytes, expected: bytes) -> None:
    path = tmp_path / "message"
    path.write_bytes(raw)
    assert whole_header_lines(str(path), HEADER_LIMIT) == expected


def test_read_header_block_caps_at_a_line_boundary(tmp_path: Path) -> None:
    line = b"X-Filler: " + b"f" * 88 + b"\r\n"  # 100 bytes
    path = tmp_path / "message"
    path.write_bytes(line * 5000 + b"\r\n" + BODY)

    head = whole_header_lines(str(path), HEADER_LIMIT)
    assert len(head) == HEADER_LIMIT // 100 * 100
    assert head == line * (HEADER_LIMIT // 100)
    assert whole_header_lines(str(path), 250) == line * 2


def test_read_header_block_stops_at_the_empty_line(tmp_path: Path) -> None:
    """A FIFO whose writer stays open: reading past the headers would block until it gives up."""
    fifo = tmp_path / "message"
    os.mkfifo(fifo)
    release = threading.Event()
    gave_up: list[bool] = []

    def writer() -> None:
        with open(fifo, "wb", buffering=0) as fh:
            fh.write(HEADERS + b"\r\n" + b"first body chunk\r\n")
            gave_up.append(not release.wait(timeout=10))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert whole_header_lines(str(fifo), HEADER_LIMIT) == HEADERS
    finally:
        release.set()
        thread.join()
    assert gave_up == [False]


# -- relay parsing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("relay", "expected"),
    [
        pytest.param("127.0.0.1:25", ("127.0.0.1", 25), id="ipv4"),
        pytest.param("relay.example.com:2525", ("relay.example.com", 2525), id="name"),
        pytest.param("relay.example.com", ("relay.example.com", 25), id="default-port"),
        pytest.param("[::1]:587", ("::1", 587), id="ipv6"),
        pytest.param("[::1]", ("::1", 25), id="ipv6-default-port"),
    ],
)
def test_parse_relay(relay: str, expected: tuple[str, int]) -> None:
    assert parse_relay(relay) == expected


@pytest.mark.parametrize("relay", ["", "host:", "host:port", "::1:25", "host:70000",
                                   "a b:25", "host:25\r\nRSET"])
def test_parse_relay_rejects(relay: str) -> None:
    with pytest.raises(ValueError, match="bounce relay"):
        parse_relay(relay)


# -- against real SMTP servers -----------------------------------------------------


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


@pytest.fixture
def silent_port() -> Iterator[socket.socket]:
    """A port that listens but never speaks: connections wait in the backlog, visibly."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def _no_connection(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def _settings(relay: str, **changes: Any) -> SimpleNamespace:
    defaults = WorkerSettings()
    fields: dict[str, Any] = dict(
        bounce_relay=relay, smtp_timeout=5.0,
        bounce_require_authenticated=defaults.bounce_require_authenticated,
        bounce_rate_per_sender=defaults.bounce_rate_per_sender,
        bounce_rate_per_client=defaults.bounce_rate_per_client,
        bounce_rate_period=defaults.bounce_rate_period)
    fields.update(changes)
    return SimpleNamespace(**fields)


def _context(tmp_path: Path, relay: str, job: Job | None = None,
             action: BounceAction = ACTION, recipients: tuple[str, ...] = (RCPT,),
             limiter: BounceLimiter | None = None, **settings: Any) -> ActionContext:
    job = job or _job()
    path = tmp_path / "message"
    path.write_bytes(HEADERS + b"\r\n" + BODY)
    return ActionContext(
        job=job, matched=MatchedRule(job.rules[0].rule, recipients), action=action,
        rule_index=0, action_index=0, message_path=str(path), added_headers=(),
        clients=None, settings=_settings(relay, **settings),
        bounce_limiter=limiter if limiter is not None else BounceLimiter(),
    )


def test_run_sends_the_dsn_with_an_empty_envelope_sender(
        tmp_path: Path, sink: SmtpSink, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rcpts = (RCPT, "carol@example.com")
    ctx = _context(tmp_path, f"127.0.0.1:{sink.port}", recipients=rcpts)

    outcome = run(ctx)

    (got,) = sink.wait_for(1, timeout=10)
    assert got.mail_from == NULL_SENDER
    assert got.rcpt_tos == (SENDER,)
    msg = _assert_well_formed(got.data, 2)
    assert msg["To"] == SENDER and msg["From"] == ACTION.sender
    assert [b["Final-Recipient"] for b in _report_blocks(msg)[1:]] == [
        f"rfc822; {r}" for r in rcpts]
    assert _parts(msg)[2].get_payload(decode=True) == HEADERS
    assert b"SECRET BODY" not in got.data
    assert outcome == Outcome(detail=f"bounced 2 recipients to <{SENDER}> (5.1.1) via "
                                     f"127.0.0.1:{sink.port}")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


UNAUTHENTICATED = {"spam": "PASS", "virus": "PASS", "spf": "FAIL", "dkim": "GRAY",
                   "dmarc": "FAIL"}


@pytest.mark.parametrize(
    "verdicts",
    [
        pytest.param(UNAUTHENTICATED, id="spf-fail"),
        pytest.param({**UNAUTHENTICATED, "spf": "GRAY", "dmarc": "GRAY"}, id="gray"),
        pytest.param(dict.fromkeys(UNAUTHENTICATED, "DISABLED"), id="unscanned"),
        pytest.param({}, id="no-verdicts"),
    ],
)
def test_unauthenticated_sender_gets_no_dsn(tmp_path: Path, silent_port: socket.socket,
                                            verdicts: dict[str, str]) -> None:
    relay = f"127.0.0.1:{silent_port.getsockname()[1]}"
    outcome = run(_context(tmp_path, relay, job=_job(verdicts=verdicts)))
    assert outcome.suppressed == "unauthenticated"
    assert outcome.disposition == "CONTINUE"
    assert "suppressed (unauthenticated" in outcome.detail and SENDER in outcome.detail
    assert _no_connection(silent_port)


def test_authentication_can_be_switched_off(tmp_path: Path, sink: SmtpSink) -> None:
    ctx = _context(tmp_path, f"127.0.0.1:{sink.port}", job=_job(verdicts=UNAUTHENTICATED),
                   bounce_require_authenticated=False)
    assert run(ctx).suppressed == ""
    (got,) = sink.wait_for(1, timeout=10)
    assert got.rcpt_tos == (SENDER,)


def test_rate_limit_suppresses_and_a_failed_send_is_not_counted(
        tmp_path: Path, sink: SmtpSink) -> None:
    limiter = BounceLimiter()
    down = f"127.0.0.1:{free_port()}"
    up = f"127.0.0.1:{sink.port}"
    with pytest.raises(RelayError):
        run(_context(tmp_path, down, limiter=limiter, bounce_rate_per_sender=1))
    first = run(_context(tmp_path, up, limiter=limiter, bounce_rate_per_sender=1))
    second = run(_context(tmp_path, up, limiter=limiter, bounce_rate_per_sender=1))
    assert (first.suppressed, second.suppressed) == ("", "sender-rate")
    assert "more than 1 DSNs in 3600 s" in second.detail
    assert len(sink.wait_for(1, timeout=10)) == 1
    other = _job(mail_from="other@example.net")
    third = run(_context(tmp_path, up, job=other, limiter=limiter, bounce_rate_per_sender=1,
                         bounce_rate_per_client=1))
    assert third.suppressed == "client-rate"  # the same client: 192.0.2.1
    assert len(sink.messages) == 1


def test_send_dsn_non_ascii_sender_uses_smtputf8(sink: SmtpSink) -> None:
    to = "jörg@exämple.de"
    dsn = build_dsn(_job(mail_from=to), ACTION, [RCPT], HEADERS, now=NOW)

    send_dsn(f"127.0.0.1:{sink.port}", to, dsn, timeout=5)

    (got,) = sink.wait_for(1, timeout=10)
    assert (got.mail_from, got.rcpt_tos) == (NULL_SENDER, (to,))
    assert _parse(got.data)["To"] == to


def test_send_dsn_quoted_local_part_goes_on_the_wire_verbatim(sink: SmtpSink) -> None:
    to = '"john doe"@example.net'
    send_dsn(f"127.0.0.1:{sink.port}", to,
             build_dsn(_job(mail_from=to), ACTION, [RCPT], HEADERS, now=NOW), timeout=5)
    (got,) = sink.wait_for(1, timeout=10)
    assert got.rcpt_tos == (to,)


@pytest.mark.parametrize("mail_from", ["", "  "])
def test_null_sender_is_never_bounced(tmp_path: Path, silent_port: socket.socket,
                                      sink: SmtpSink, mail_from: str) -> None:
    for relay in (f"127.0.0.1:{silent_port.getsockname()[1]}", f"127.0.0.1:{sink.port}"):
        outcome = run(_context(tmp_path, relay, job=_job(mail_from=mail_from)))
        assert outcome == Outcome(detail="not bounced: the envelope sender is empty (<>)")
    assert _no_connection(silent_port)
    assert sink.messages == []


def test_sender_with_control_characters_is_permanent_and_unsent(
        tmp_path: Path, silent_port: socket.socket) -> None:
    ctx = _context(tmp_path, f"127.0.0.1:{silent_port.getsockname()[1]}",
                   job=_job(mail_from=f"evil@example.net{INJECT}"))
    with pytest.raises(PermanentActionError, match="cannot bounce to"):
        run(ctx)
    assert _no_connection(silent_port)


def test_refused_connection_raises_for_a_retry(tmp_path: Path) -> None:
    relay = f"127.0.0.1:{free_port()}"
    with pytest.raises(RelayError, match="cannot connect") as caught:
        run(_context(tmp_path, relay))
    assert not isinstance(caught.value, PermanentActionError)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_silent_relay_times_out(silent_port: socket.socket) -> None:
    relay = f"127.0.0.1:{silent_port.getsockname()[1]}"
    with pytest.raises(RelayError):
        send_dsn(relay, SENDER, build_dsn(_job(), ACTION, [RCPT], HEADERS), timeout=0.5)


class _Rejecting:
    """aiosmtpd handler that answers `reply` at one step and accepts the rest."""

    def __init__(self, step: str, reply: str) -> None:
        self.step = step
        self.reply = reply
        self.received = 0

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self.step == "MAIL":
            return self.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if self.step == "RCPT":
            return self.reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.step == "DATA":
            return self.reply
        self.received += 1
        return "250 2.0.0 Ok"


def _serve(handler: object, **options: Any) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **options)
    controller.start()
    return controller


@pytest.mark.parametrize(
    ("step", "reply", "error"),
    [
        pytest.param("RCPT", "550 5.1.1 No such user here", PermanentActionError, id="rcpt-550"),
        pytest.param("MAIL", "553 5.1.8 Sender rejected", PermanentActionError, id="mail-553"),
        pytest.param("DATA", "554 5.6.0 Content rejected", PermanentActionError, id="data-554"),
        pytest.param("RCPT", "450 4.2.0 Greylisted", RelayError, id="rcpt-450"),
        pytest.param("DATA", "451 4.3.0 Try later", RelayError, id="data-451"),
    ],
)
def test_relay_rejections(tmp_path: Path, step: str, reply: str,
                          error: type[Exception]) -> None:
    handler = _Rejecting(step, reply)
    controller = _serve(handler)
    try:
        with pytest.raises(error) as caught:
            run(_context(tmp_path, f"127.0.0.1:{controller.port}"))
    finally:
        controller.stop()
    assert reply in str(caught.value)
    assert handler.received == 0


def test_relay_without_smtputf8_is_permanent_for_a_utf8_address() -> None:
    handler = _Rejecting("", "")
    controller = _serve(handler, enable_SMTPUTF8=False)
    to = "jörg@exämple.de"
    try:
        with pytest.raises(PermanentActionError, match="SMTPUTF8"):
            send_dsn(f"127.0.0.1:{controller.port}", to,
                     build_dsn(_job(mail_from=to), ACTION, [RCPT], HEADERS), timeout=5)
    finally:
        controller.stop()
    assert handler.received == 0


# -- an email over an S3 or SNS action's size limit ----------------------------------

@pytest.mark.parametrize("action", [
    pytest.param(S3Action(bucket_name="mail-bucket"), id="s3"),
    pytest.param(SNSAction(topic_arn="arn:aws:sns:us-east-1:123456789012:t"), id="sns"),
])
def test_too_big_sends_a_552_dsn_as_a_bounce_action_would(tmp_path: Path, sink: SmtpSink,
                                                          action: Action) -> None:
    ctx = replace(_context(tmp_path, f"127.0.0.1:{sink.port}", job=_job()),
                  action=action)
    outcome = too_big(ctx, 200_000, 153_600)
    assert outcome.bounced and outcome.suppressed == ""
    assert outcome.detail.startswith(f"message of 200000 bytes, over the {action.TYPE} limit "
                                     "of 153600: bounced 1 recipient")
    (got,) = sink.wait_for(1, timeout=10)
    assert (got.mail_from, got.rcpt_tos) == (NULL_SENDER, (SENDER,))
    msg = _assert_well_formed(got.data, 1)
    [block] = _report_blocks(msg)[1:]
    assert (block["Final-Recipient"], block["Status"]) == (f"rfc822; {RCPT}", "5.3.4")
    assert f"the 153600 bytes the receiving system's {action.TYPE} action" in " ".join(
        _parts(msg)[0].get_payload(decode=True).decode().split())


def test_too_big_to_an_unauthenticated_sender_is_suppressed_not_failed(
        tmp_path: Path, silent_port: socket.socket) -> None:
    ctx = replace(_context(tmp_path, f"127.0.0.1:{silent_port.getsockname()[1]}",
                           job=_job(verdicts=UNAUTHENTICATED)),
                  action=SNSAction(topic_arn="arn:aws:sns:us-east-1:123456789012:t"))
    outcome = too_big(ctx, 160_000, 153_600)
    assert (outcome.bounced, outcome.suppressed) == (True, "unauthenticated")
    assert _no_connection(silent_port)
