"""Fuzz targets: every place mxrules parses bytes that come from the Internet.

Each `Target` pairs a hypothesis strategy (generated hostile input: 8-bit and
NUL bytes, bare CR and LF, over-long lines, deep nesting, broken MIME) with a
check that runs the real code on it and asserts what must hold whatever the
input: no exception but the documented ones, no hang (every input runs under
a time bound, `TIME_BOUND`), and the target's own invariants -- no header
injection in what mxrules writes, JSON payloads that parse, a spooled job for
every message the milter let through.

Used twice: `test_fuzz_seed.py` runs every target briefly in the test suite,
`bench/fuzz.py` runs them for 100,000+ inputs and prints a summary.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from harness.dns import DnsServer
from harness.jobs import make_job
from mxrules import authres, headblock, payload, ses
from mxrules.actions import bounce
from mxrules.actions import dsn as dsn_module
from mxrules.actions.base import PermanentActionError
from mxrules.actions.lambda_invoke import disposition_of
from mxrules.config import load
from mxrules.decision import Engine
from mxrules.errors import ConfigError, CorruptJobError
from mxrules.headblock import read_head
from mxrules.ipfilter import load_blocklist, parse_cidr, parse_ip
from mxrules.jobstate import complete
from mxrules.matching import ManagedDomains, split_address
from mxrules.metrics import MilterMetrics
from mxrules.milter.session import EomResult, Runtime, Session
from mxrules.received import OriginalClient, original_client, parse_received, read_received
from mxrules.rules import (
    SNS_EMAIL_LIMIT,
    AddHeaderAction,
    BounceAction,
    LambdaAction,
    Rule,
    S3Action,
    SNSAction,
)
from mxrules.scan import auth
from mxrules.scan.dkim_body import BodyCanon
from mxrules.spool import Client, Job, MatchedRule, Spool
from mxrules.spool_cli import row
from mxrules.text import CONTROLS

TIME_BOUND = 10.0  # seconds one input may take; generous, so a loaded host passes


class Hang(Exception):
    """An input ran longer than TIME_BOUND."""


@contextlib.contextmanager
def time_bound(seconds: float = TIME_BOUND) -> Iterator[None]:
    """Raise Hang in the main thread if the block runs longer than `seconds`."""

    def alarm(_signum: int, _frame: FrameType | None) -> None:
        raise Hang(f"input took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Target:
    name: str
    what: str  # one line for the summary
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    weight: float = 1.0  # share of a long run's inputs: slow targets get fewer
    notes: dict[str, int] = field(default_factory=dict)  # outcomes seen, for the summary

    def note(self, outcome: str) -> None:
        self.notes[outcome] = self.notes.get(outcome, 0) + 1


# -- scratch space shared by the targets that need files --------------------------

_SCRATCH: str | None = None


def scratch() -> str:
    global _SCRATCH
    if _SCRATCH is None or not os.path.isdir(_SCRATCH):
        _SCRATCH = tempfile.mkdtemp(prefix="mxrules-fuzz-")
    return _SCRATCH


def cleanup() -> None:
    global _SCRATCH, _RUNTIME
    if _DNS.port:
        _DNS.stop()
    _RUNTIME = None
    if _LOG_LEVEL:
        logging.getLogger("mxrules").setLevel(_LOG_LEVEL.pop())
    if _SCRATCH is not None:
        shutil.rmtree(_SCRATCH, ignore_errors=True)
        _SCRATCH = None


def _file(name: str, data: bytes) -> str:
    path = os.path.join(scratch(), name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


# -- hostile bytes -----------------------------------------------------------------

NASTY = [b"\x00", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"\xff", b"\xc3\xa9",
         b"\xed\xa0\x80", b"\t", b" ", b":", b";", b",", b"<", b">", b'"', b"\\", b"(", b")",
         b"@", b"=?utf-8?b?", b"--", b"\x1b", b"\x7f", b"\x85", "\u2028".encode(), b"%00",
         b"\r\nBcc: x@evil.test"]

nasty_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(st.sampled_from(NASTY), st.binary(max_size=12),
                       st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass"))),
             max_size=24).map(b"".join),
    st.builds(lambda b, n: b * n, st.sampled_from([b"a", b"\xff", b"a ", b"(", b"<", b"\""]),
              st.sampled_from([998, 999, 2000, 20_000])),
)
nasty_text = st.one_of(
    st.text(max_size=80),
    nasty_bytes.map(lambda b: b.decode("utf-8", "surrogateescape")),  # pymilter's decoding
)

HEADER_NAMES = ["From", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID", "Reply-To", "Sender",
                "Return-Path", "Received", "Content-Type", "Content-Transfer-Encoding",
                "MIME-Version", "Authentication-Results", "DKIM-Signature", "X-Junk"]
header_names = st.one_of(
    st.sampled_from(HEADER_NAMES),
    st.sampled_from(HEADER_NAMES).map(str.upper),
    st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
            min_size=1, max_size=30),
)
ADDRESS_PARTS = ["user@example.com", "<user@example.com>", '"a, b" <x@example.com>', "a@b@c",
                 "Name <a@[192.0.2.1]>", "group: a@x.test, b@y.test;", "(comment) a@x.test",
                 "<>", "@", "", "a@", "@b", "\"unterminated <x@y>", "a@x.test (", "<<a@b>>",
                 "user+tag@sub.example.com", "用户@例子.广告", "=?utf-8?q?=E9?= <a@x.test>"]
address_lists = st.lists(st.one_of(st.sampled_from(ADDRESS_PARTS), nasty_text),
                         max_size=6).map(", ".join)


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    """A header block: mostly well-formed fields, with junk lines, folds and odd line ends."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["field", "field", "field", "fold", "junk"]))
        if kind == "field":
            name = draw(header_names).encode("ascii")
            value = draw(st.one_of(address_lists.map(lambda s: s.encode("utf-8", "surrogatepass")),
                                   nasty_bytes))
            lines.append(name + draw(st.sampled_from([b":", b": ", b" :", b":\t"])) + value)
        elif kind == "fold":
            lines.append(draw(st.sampled_from([b" ", b"\t", b"   "])) + draw(nasty_bytes))
        else:
            lines.append(draw(nasty_bytes))
    ending = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    return ending.join(lines) + draw(st.sampled_from([b"", ending, ending * 2]))


@st.composite
def mime_bodies(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A MIME entity body: nested multiparts (up to 200 deep), broken base64, bad boundaries."""
    kind = draw(st.sampled_from(["text", "base64", "multi", "multi", "garbage"]
                                if depth < 6 else ["text", "base64", "deep"]))
    if kind == "text":
        return b"Content-Type: text/plain\r\n\r\n" + draw(nasty_bytes) + b"\r\n"
    if kind == "base64":
        data = base64.b64encode(draw(st.binary(max_size=60)))
        data = draw(st.sampled_from([data, data[:-1], data + b"!!", b"====", b"\x00" + data]))
        return b"Content-Transfer-Encoding: base64\r\n\r\n" + data + b"\r\n"
    if kind == "garbage":
        return (b"Content-Type: " + draw(nasty_bytes) + b"\r\n\r\n" + draw(nasty_bytes))
    if kind == "deep":
        levels = draw(st.sampled_from([50, 200]))
        out = b"x\r\n"
        for i in range(levels):
            out = (f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
                   + out + f"\r\n--b{i}--\r\n".encode())
        return out
    boundary = draw(st.sampled_from([b"b1", b"", b"a" * 80, b"\"", b"--", b"b1\x00"]))
    parts = [draw(mime_bodies(depth=depth + 1)) for _ in range(draw(st.integers(0, 3)))]
    head = b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
    if draw(st.booleans()):  # the boundary never shows up, or the end is missing
        boundary = boundary + b"x"
    closing = draw(st.sampled_from([b"--" + boundary + b"--\r\n", b""]))
    return head + b"".join(b"--" + boundary + b"\r\n" + p for p in parts) + closing


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    return draw(header_blocks()) + b"\r\n" + draw(mime_bodies())


# -- a job like the milter writes, for the payload and DSN targets -----------------

RULE = Rule(name="r", enabled=True, recipients=("example.com",),
            actions=(AddHeaderAction(header_name="X-A", header_value="1"),
                     S3Action(bucket_name="b"), SNSAction(encoding="Base64"),
                     LambdaAction(function_arn="arn:aws:lambda:us-east-1:1:function:f")))


def base_job(**changes: Any) -> Job:
    fields: dict[str, Any] = dict(
        client=Client(address="192.0.2.1", hostname="mail.example.net", helo="mail"),
        rules=(MatchedRule(RULE, ("user@example.com",)),), message_sha256="",
    )
    fields.update(changes)
    return make_job(**fields)


def _json_roundtrip(obj: Any) -> None:
    text = payload.to_json(obj)
    assert json.loads(text) == obj
    text.encode("utf-8")  # SNS and Lambda send UTF-8: a lone surrogate would fail here


def _no_injection(block: bytes, names: list[str]) -> None:
    """`block` (CRLF-ended lines) holds exactly the fields `names`, in order, and no others."""
    assert block.endswith(b"\r\n") or not block
    lines = block[:-2].split(b"\r\n") if block else []
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, line
    starts = [line.split(b":", 1)[0].decode("ascii") for line in lines
              if not line.startswith((b" ", b"\t"))]
    assert starts == names, (starts, names)


# -- targets ---------------------------------------------------------------------


def check_headers(block: bytes) -> None:
    """parse_headers and everything built from its output for SES's `mail` object."""
    headers = payload.parse_headers(block)
    for name, value in headers:
        assert payload._FIELD_NAME.fullmatch(name.encode("ascii")), name
        assert "\n" not in value
    common = payload.common_headers(headers)
    _json_roundtrip(common)
    for value in (v for _, v in headers):
        for item in payload.split_addresses(value):
            assert item and item == item.strip()
    mail = payload.mail_object(base_job(), headers, truncated=False)
    kept = sum(len(h["name"].encode()) + len(h["value"].encode()) + 4 for h in mail["headers"])
    assert kept <= payload.HEADERS_LIMIT
    assert mail["headersTruncated"] == (len(mail["headers"]) < len(headers))
    _json_roundtrip(mail)


def check_header_block(args: tuple[bytes, int]) -> None:
    """Both header-block readers on a file: a prefix of it, never past the limit."""
    data, limit = args
    path = _file("block", data)
    block, capped = headblock.header_lines(path, limit)
    assert data.startswith(block) and len(block) <= limit
    dsn_block = headblock.whole_header_lines(path, limit)
    assert data.startswith(dsn_block) and len(dsn_block) <= limit
    if not capped:  # the whole block was read: what follows is the empty line, or nothing
        assert data[len(block):].startswith((b"\r\n", b"\n")) or len(block) == len(data)


def check_message(raw: bytes) -> None:
    """A whole message as the worker sees it: SES payloads, stored copy, DSN."""
    path = _file("message", raw)
    job = base_job(message_size=len(raw), message_sha256=hashlib.sha256(raw).hexdigest())
    added = (("X-A", "1"),)
    headers, capped = payload.stored_copy_headers(job, path, added)
    matched = job.rules[0]
    for action in matched.rule.actions:
        if isinstance(action, SNSAction):
            with payload.StoredCopy(job, path, added) as copy:
                content = copy.read_all()
            assert content.endswith(raw)
            for encoding in ("UTF-8", "Base64"):
                try:
                    note = payload.notification_json(job, matched, action, headers=headers,
                                                     truncated=capped, processing_ms=1,
                                                     content=content, encoding=encoding)
                except payload.PayloadTooLarge:
                    # The SNS action bounces such an email.  Within SES's 150 KB, only
                    # UTF-8 text can swell past SNS's 256 KB: Base64 always fits.
                    assert encoding == "UTF-8" or len(content) > SNS_EMAIL_LIMIT
                    target_by_name["message"].note("notification over 256 KB")
                    continue
                assert len(note.encode()) <= payload.NOTIFICATION_LIMIT
                parsed = json.loads(note)
                if encoding == "Base64":
                    assert base64.b64decode(parsed["content"]) == content
        elif isinstance(action, LambdaAction):
            _json_roundtrip(payload.lambda_event(job, matched, action, headers=headers,
                                                 truncated=capped, processing_ms=1))
        else:
            _json_roundtrip(payload.notification(job, matched, action, headers=headers,
                                                 truncated=capped, processing_ms=1))
    dsn = dsn_module.build_dsn(job, BounceAction(smtp_reply_code="550", status_code="5.1.1",
                                             message="gone", sender="mailer@example.com"),
                           job.recipients, headblock.whole_header_lines(path, bounce.HEADER_LIMIT))
    _check_dsn(dsn, job, ascii_only=True)


def _check_dsn(dsn: bytes, job: Job, *, ascii_only: bool) -> None:
    head, sep, _body = dsn.partition(b"\r\n\r\n")
    assert sep
    assert len(dsn) <= dsn_module.MAX_DSN
    _no_injection(head + b"\r\n", ["From", "To", "Subject", "Date", "Message-ID",
                                   "Auto-Submitted", "MIME-Version", "Content-Type"])
    for line in dsn.split(b"\r\n"):
        assert len(line) <= 998 and b"\r" not in line and b"\n" not in line
    if ascii_only:
        assert dsn.isascii()
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    parts = msg.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]


dsn_inputs = st.fixed_dictionaries({
    "mail_from": nasty_text, "hostname": nasty_text, "message_id": nasty_text,
    "received_at": st.one_of(nasty_text, st.just("2026-01-01T00:00:00.000Z")),
    "smtp_reply_code": st.one_of(nasty_text, st.sampled_from(["550", "450", "554"])),
    "status_code": st.one_of(st.none(), nasty_text, st.sampled_from(["5.1.1", "4.0.0"])),
    "message": nasty_text, "sender": nasty_text,
    "recipients": st.lists(nasty_text, min_size=1, max_size=4),
    "headers": st.one_of(nasty_bytes, header_blocks()),
})


def check_dsn(d: dict[str, Any]) -> None:
    """build_dsn with every field hostile: 7-bit (or UTF-8 From/To), no injection, parses."""
    job = base_job(mail_from=d["mail_from"], hostname=d["hostname"],
                   message_id=d["message_id"], received_at=d["received_at"])
    action = BounceAction(smtp_reply_code=d["smtp_reply_code"], status_code=d["status_code"],
                          message=d["message"], sender=d["sender"])
    try:
        bounce.check_envelope_address(d["mail_from"])
    except (ValueError, PermanentActionError):
        target_by_name["dsn"].note("envelope refused")
    dsn = dsn_module.build_dsn(job, action, d["recipients"], d["headers"])
    _check_dsn(dsn, job, ascii_only=False)
    head = dsn.partition(b"\r\n\r\n")[0].split(b"\r\n")
    body = dsn.partition(b"\r\n\r\n")[2]
    assert body.isascii()
    assert all(line.isascii() for line in head if not line.startswith((b"From:", b"To:")))


def check_address(text: str) -> None:
    """Everything that reads an address or a client address from SMTP."""
    parts = split_address(text)
    if parts is not None:
        assert parts[0] and parts[1] == parts[1].lower()
    domain = parts[1] if parts else text
    # Managed: example.com and every name below it, case and a root dot aside.
    plain = domain.lower().rstrip(".")
    assert (domain in ManagedDomains(["example.com", ".example.com"])) == (
        plain == "example.com" or plain.endswith(".example.com"))
    ADDRESS_ENGINE.index.match(text)
    decision = ADDRESS_ENGINE.rcpt(text, tls=False)
    assert decision.outcome in ("unmanaged", "accepted", "no-rule", "tls-required")
    assert "\n" not in str(decision.reply) or "\n" in text
    header = dsn_module._header_address(text)
    if header is not None:
        assert not CONTROLS.search(header) and "@" in header
    report = dsn_module._report_address(text)
    assert report.isascii() and "\r" not in report and "\n" not in report
    for item in payload.split_addresses(text):
        assert item
    payload._addresses(text)
    for parser in (parse_ip, parse_cidr):
        with contextlib.suppress(ValueError):
            parser(text)
    with contextlib.suppress(ConfigError):
        load_blocklist("blocklist", text)
    raw = text.encode("utf-8", "surrogateescape")
    hop = parse_received(raw)
    if hop is not None:
        assert isinstance(hop.address, ipaddress.IPv4Address | ipaddress.IPv6Address)
    original_client([raw, b"from x ([192.0.2.9])"], lambda a: False)


addresses = st.one_of(
    st.sampled_from(ADDRESS_PARTS), nasty_text,
    st.builds(lambda a, b: f"{a}@{b}", nasty_text, nasty_text),
    st.builds(lambda a: f"from {a}", nasty_text),
    st.sampled_from(["::ffff:1.2.3.4", "[IPv6:2001:db8::1]", "1.2.3.4/33", "fe80::1%eth0",
                     "999.1.1.1", "from helo ([10.0.0.1] helo=x)", "from h (h [::1])"]),
)

ADDRESS_ENGINE: Engine


def _address_engine() -> Engine:
    path = _file("address.yaml", textwrap.dedent("""\
        domains: [example.com, .example.com]
        rule_sets:
          default:
            - {name: a, enabled: true, recipients: [user@example.com, .example.com]}
            - {name: b, enabled: true, tls_policy: Require, recipients: [secure.example.com]}
        """).encode())
    return Engine(load(path))


# Received headers: what a trusted forwarder writes around a client's hostile HELO.
TRUE_CLIENTS = ["198.51.100.23", "2001:db8:bad::5", "::ffff:198.51.100.24"]
_POSTFIX_HIDES = str.maketrans({c: "?" for c in ' \t()"@;\\<>'})


def _postfix_helo(helo: str) -> str:
    """A HELO as Postfix prints it in Received (smtpd.c: the client's text, made safe)."""
    return "".join(c if " " < c < "\x7f" else "?" for c in helo.translate(_POSTFIX_HIDES))


def _line_limit(value: str) -> str:
    """What Postfix's smtp client does to a line over 998 characters (CRLF SPACE)."""
    lines = []
    for line in value.split("\n"):
        first = 998 - len("Received:")
        while len(line) > first:
            lines.append(line[:first])
            line, first = " " + line[first:], 998
        lines.append(line)
    return "\n".join(lines)


def _literal(ip: str, prefix: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{prefix}{addr}" if isinstance(addr, ipaddress.IPv6Address) else str(addr)


@st.composite
def received_values(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """(a Received value, the client it truly names, or None when not one of the forms)."""
    ip = draw(st.sampled_from(TRUE_CLIENTS))
    helo = draw(st.one_of(nasty_text, st.sampled_from(
        ["[203.0.113.9]", "x (r [203.0.113.9]) by y", "[203.0.113.9] (helo=x)", "(203.0.113.9)",
         "a" * 1100, "(x [203.0.113.9])\n\tby y", "x@[203.0.113.9]"])))
    helo = helo.replace("\r", "").replace("\n", "")  # an SMTP command is one line
    rcpt = draw(st.one_of(nasty_text, st.just('" (203.0.113.9) by x"@example.com')))
    mta = draw(st.sampled_from(["postfix", "exim", "sendmail", "exchange", "junk"]))
    if mta == "postfix":
        value = _line_limit(f" from {_postfix_helo(helo) or 'unknown'} (unknown "
                            f"[{_literal(ip, 'IPv6:')}])\n\tby relay (Postfix) with ESMTP id "
                            f"4QxAbc1\n\tfor <{rcpt}>; Sat, 28 Nov 2026 10:00:00 +0000")
    elif mta == "exim":  # Exim refuses a HELO that is not a name or a literal
        name = "".join(c for c in helo if c.isascii() and (c.isalnum() or c in ".-[]:")) or "x"
        value = (f" from [{_literal(ip, '')}] (helo={name})\n\tby relay with esmtp "
                 f"(Exim 4.96)\n\t(envelope-from <{rcpt}>)\n\tid 1xYdAs-00033T-09")
    elif mta == "sendmail":  # with AllowBogusHELO: the HELO as given
        value = (f" from {helo} ([{_literal(ip, 'IPv6:')}])\n\tby relay (8.17.1/8.17.1) "
                 f"with ESMTP id 5B2A\n\tfor <{rcpt}>; Sat, 28 Nov 2026 10:00:00 GMT")
    elif mta == "exchange":
        value = (f" from {helo} ({_literal(ip, '')}) by EXCH01.corp.example (10.0.0.6) with "
                 "Microsoft SMTP Server id 15.1.2507.39; Sat, 28 Nov 2026 10:00:00 +0000")
    else:
        return draw(nasty_bytes), None
    return value.encode("utf-8", "surrogateescape"), ip


def check_received(args: tuple[bytes, str | None]) -> None:
    """Whatever the client wrote, the address read is the one the MTA wrote, or none."""
    value, true = args
    hop, why = read_received(value)
    assert (hop is None) == bool(why) and why in ("", "unparsable", "ambiguous")
    target_by_name["received"].note(f"{hop.form if hop else why}")
    if hop is not None and true is not None:
        assert hop.address == parse_ip(true), (value, hop)
    if true is not None:
        assert hop is not None or why == "ambiguous", (value, why)
    walk = OriginalClient(lambda a: str(a) == "192.0.2.250")
    for header in (b" from r (r [192.0.2.250])\n\tby relay (Postfix) id 1", value):
        walk.add(header)
    assert walk.result()[0] == hop


# SES exports: text, then documents shaped like an export with hostile values.
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              nasty_text, st.sampled_from(["Enabled", "Require", "Allow", "Block",
                                           "10.0.0.0/8", "arn:aws:sns:us-east-1:1:t"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(nasty_text, st.sampled_from(
            ["Name", "Enabled", "Recipients", "Actions", "TlsPolicy", "ScanEnabled",
             "S3Action", "BucketName", "AddHeaderAction", "HeaderName", "HeaderValue",
             "IpFilter", "Policy", "Cidr", "WorkmailAction", "BounceAction"])),
            inner, max_size=5)),
    max_leaves=20)


@st.composite
def ses_exports(draw: st.DrawFn) -> tuple[str, str]:
    """(rule set export text, filter export text)."""
    rules = draw(st.lists(st.fixed_dictionaries(
        {"Name": st.one_of(st.just("r1"), json_values)},
        optional={"Enabled": json_values, "Recipients": json_values, "Actions": json_values,
                  "TlsPolicy": json_values, "ScanEnabled": json_values, "Junk": json_values}),
        max_size=3))
    doc = {"Metadata": {"Name": draw(st.one_of(st.just("default"), json_values))},
           "Rules": rules}
    filters = {"Filters": draw(st.lists(st.one_of(json_values, st.fixed_dictionaries(
        {"Name": json_values, "IpFilter": st.fixed_dictionaries(
            {"Policy": json_values, "Cidr": json_values})})), max_size=3))}
    texts = [json.dumps(doc), json.dumps(filters)]
    if draw(st.booleans()):  # and now and then the text itself is broken
        i = draw(st.integers(0, 1))
        mangle = draw(st.sampled_from(["cut", "nest", "bytes"]))
        if mangle == "cut":
            texts[i] = texts[i][:draw(st.integers(0, len(texts[i])))]
        elif mangle == "nest":
            texts[i] = "[" * 20_000
        else:
            texts[i] = draw(nasty_text)
    return texts[0], texts[1]


def _config_problems_are_clean(exc: ConfigError, main: str) -> None:
    assert exc.problems
    for problem in exc.problems:
        assert problem.file.startswith(scratch()), problem
        assert "\n" not in problem.file
        assert "Traceback" not in str(problem)


def check_ses(texts: tuple[str, str]) -> None:
    rules_text, filters_text = texts
    _file("rule-set.json", rules_text.encode("utf-8", "surrogateescape"))
    _file("filters.json", filters_text.encode("utf-8", "surrogateescape"))
    for text in texts:
        with contextlib.suppress(ConfigError):
            ses.read_json("x.json", text)
    main = _file("ses.yaml", b"rule_set_file: rule-set.json\nip_filter_file: filters.json\n")
    try:
        cfg = load(main)
    except ConfigError as exc:
        _config_problems_are_clean(exc, main)
        target_by_name["ses"].note("refused")
        return
    target_by_name["ses"].note("loaded")
    Engine(cfg)


# The config: a valid file with hostile edits, or hostile text.
BASE_CONFIG: dict[str, Any] = {
    "hostname": "mx.example.com",
    "domains": ["example.com"],
    "ip_filters": [{"name": "f", "policy": "Block", "cidr": "10.0.0.0/8"}],
    "rule_sets": {"default": [
        {"name": "r", "enabled": True, "recipients": ["user@example.com"],
         "actions": [{"add_header": {"header_name": "X-A", "header_value": "v"}},
                     {"bounce": {"smtp_reply_code": "550", "message": "m",
                                 "sender": "a@example.com"}}]}]},
    "worker": {"threads": 2},
    "limits": {"rules_per_rule_set": 200},
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    import yaml

    kind = draw(st.sampled_from(["edit", "edit", "edit", "text", "injection", "deep"]))
    if kind == "text":
        return draw(st.one_of(st.text(max_size=200), nasty_text))
    if kind == "deep":
        return draw(st.sampled_from(["[" * 1200, "a:\n" + "".join(
            " " * (i + 1) + "- \n" for i in range(1500)), "{" * 1200]))
    doc = json.loads(json.dumps(BASE_CONFIG))
    if kind == "injection":
        value = draw(st.sampled_from(["v\r\nBcc: evil@x.test", "v\n", "v\r", "\r\nX: y",
                                      "v\x00w", "v\u2028w", "v\x85w", "v\x0bw"]))
        where = draw(st.sampled_from(["header_value", "header_name", "message", "sender"]))
        action = 0 if where.startswith("header") else 1
        body = doc["rule_sets"]["default"][0]["actions"][action]
        next(iter(body.values()))[where] = value
        return yaml.safe_dump(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        new = draw(json_values)
        if not path:
            doc = new
            break
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))


def check_config(text: str) -> None:
    main = os.path.join(scratch(), "mxrules.yaml")
    try:
        cfg = load(main, text=text)
    except ConfigError as exc:
        _config_problems_are_clean(exc, main)
        target_by_name["config"].note("refused")
        return
    target_by_name["config"].note("loaded")
    for rule_set in cfg.rule_sets.values():
        for rule in rule_set.rules:
            for action in rule.actions:
                if isinstance(action, AddHeaderAction):
                    assert "\r" not in action.header_value and "\n" not in action.header_value
                    assert payload._FIELD_NAME.fullmatch(action.header_name.encode())
    Engine(cfg)


# The spool: job.json as the worker reads it back.
GOOD_JOB = base_job(in_stream_headers=(("X-A", "1"),), verdicts={"spam": "PASS"})
GOOD_RAW = GOOD_JOB.encode()


@st.composite
def job_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["flip", "cut", "insert", "random", "deep", "resigned"]))
    raw = GOOD_RAW
    if kind == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    if kind == "cut":
        return raw[:draw(st.integers(0, len(raw)))]
    if kind == "insert":
        i = draw(st.integers(0, len(raw)))
        return raw[:i] + draw(nasty_bytes) + raw[i:]
    if kind == "random":
        return draw(nasty_bytes)
    if kind == "deep":
        return draw(st.sampled_from([b"[" * 20_000, b'{"job":' * 20_000]))
    # A checksum that matches a body of the wrong shape: decoding must still not crash.
    body = json.loads(raw)["job"]
    paths = [p for p in _paths(body) if p]
    path = draw(st.sampled_from(paths))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    check = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return json.dumps({"job": body, "sha256": check}).encode("utf-8", "surrogatepass")


def check_job(raw: bytes) -> None:
    """Decode, then a worker's claim: a damaged job is detected and moved to corrupt/."""
    try:
        job = Job.decode(raw, "fuzz")
    except CorruptJobError:
        job = None
        target_by_name["spool"].note("corrupt")
    else:
        target_by_name["spool"].note("decoded")
        if json.loads(raw.decode("utf-8", "surrogatepass")).get("sha256") == json.loads(
                GOOD_RAW).get("sha256"):
            assert job == GOOD_JOB  # the checksum vouches for the original
        # What the worker and `spool list` compute from a decoded job cannot fail.
        complete(job)
        row("incoming", GOOD_JOB.message_id, job, 0.0)
    spool = Spool(os.path.join(scratch(), "spool"))
    spool.ensure()
    job_id = GOOD_JOB.message_id
    for state in ("incoming", "active", "corrupt"):
        shutil.rmtree(spool.path(state, job_id), ignore_errors=True)
    os.mkdir(spool.path("incoming", job_id))
    with open(os.path.join(spool.path("incoming", job_id), "job.json"), "wb") as fh:
        fh.write(raw)
    try:
        claim = spool.claim("incoming", job_id)
    except CorruptJobError:
        assert job is None
        assert spool.find(job_id) == "corrupt"
        return
    assert claim is not None and job is not None and claim.job == job
    claim.release()


# Authentication-Results: the authserv-id that decides whether an incoming copy is forged.
_TOKEN_CHARS = [c for c in range(0x21, 0x7F) if c not in b'()<>@,;:\\"/[]?=']


def _quote_pairs(text: bytes, special: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in special else bytes([c]) for c in text)


@st.composite
def comments(draw: st.DrawFn, depth: int = 0) -> bytes:
    """An RFC 5322 comment over hostile bytes, nested up to 3 deep."""
    parts = [b"("]
    for _ in range(draw(st.integers(0, 3))):
        if depth < 3 and draw(st.booleans()):
            parts.append(draw(comments(depth + 1)))
        else:
            parts.append(_quote_pairs(draw(nasty_bytes), b"\\()"))
        parts.append(draw(st.sampled_from([b"", b" ", b"\r\n\t"])))
    return b"".join(parts) + b")"


cfws = st.lists(st.one_of(st.sampled_from([b" ", b"\t", b"\r\n "]), comments()),
                max_size=4).map(b"".join)


@st.composite
def authres_values(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """(value, the authserv-id it names); None for raw hostile bytes (not known)."""
    if draw(st.integers(0, 3)) == 0:
        return draw(nasty_bytes), None
    before = draw(cfws)
    if draw(st.booleans()):
        raw = bytes(draw(st.lists(st.sampled_from(_TOKEN_CHARS), min_size=1, max_size=40)))
        value = before + raw + draw(st.sampled_from([b";", b" ", b"(", b"/", b"\r\n"]))
    else:
        raw = draw(nasty_bytes.filter(lambda b: b and b"\r" not in b and b"\n" not in b))
        value = before + b'"' + _quote_pairs(raw, b'\\"') + b'"'
    return value + draw(nasty_bytes), raw.decode("utf-8", "replace")


def check_authres(arg: tuple[bytes, str | None]) -> None:
    """The id is read through comments and quotes; mxrules' own header always reads as ours."""
    value, expected = arg
    found = authres.authserv_id(value)
    assert found is None or found != ""
    if expected is not None:
        assert found == expected, (value, found, expected)
        shouted = "".join(c.upper() if c.isascii() else c for c in expected)
        assert authres.claims(value, shouted)
        target_by_name["authres"].note("constructed")
    else:
        target_by_name["authres"].note("raw, no id" if found is None else "raw, an id")
    # Whatever the host name, the header mxrules writes for it reads as that host's.
    host = value.decode("utf-8", "replace")
    if host and auth.sanitize(host, 320) == host:
        mine = auth.authentication_results(
            host, auth.SpfResult("none", "mailfrom", "", ""), [], auth.DmarcResult("none"))
        assert authres.claims(mine.encode(), host), (host, mine)


# The milter session, driven as the adapter drives it.
SESSION_CONFIG = """\
hostname: mx.example.com
domains: [example.com, .example.com]
max_message_size: 20000
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
      recipients: [example.com, .example.com]
      actions:
        - add_header: {header_name: X-Everyone, header_value: "yes"}
        - lambda:
            function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f"
            invocation_type: RequestResponse
    - name: secure
      enabled: true
      tls_policy: Require
      recipients: [secure.example.com]
"""

RCPTS = ["<info@example.com>", "<user@example.com>", "<x@sub.example.com>",
         "<secure.example.com>", "<a@secure.example.com>", "<other@elsewhere.test>",
         "<unknown@nothere.example.com>", "info@EXAMPLE.COM", "<bob+tag@example.com>"]
CLIENTS = ["203.0.113.5", "198.51.100.7", "192.0.2.250", "::ffff:203.0.113.5", "2001:db8::1",
           "localhost", "", "not an address"]


@dataclass(frozen=True)
class Conversation:
    client: str
    helo: str
    tls: bool
    sender: str
    rcpts: tuple[str, ...]
    headers: tuple[tuple[str, bytes], ...]
    body: tuple[bytes, ...]
    queue_id: str


conversations = st.builds(
    Conversation,
    client=st.one_of(st.sampled_from(CLIENTS), nasty_text),
    helo=nasty_text,
    tls=st.booleans(),
    sender=st.one_of(st.sampled_from(["<a@sender.test>", "<>", ""]), addresses),
    rcpts=st.lists(st.one_of(st.sampled_from(RCPTS), addresses), min_size=1,
                   max_size=5).map(tuple),
    headers=st.lists(st.tuples(
        st.one_of(header_names, st.sampled_from(["Received", "Authentication-Results",
                                                 "X-SES-Spam-Verdict", "x-ses-virus-verdict"]),
                  nasty_text.filter(bool)),
        st.one_of(nasty_bytes, address_lists.map(lambda s: s.encode("utf-8", "surrogateescape")),
                  st.sampled_from([b"from h (h [198.51.100.9]) by relay",
                                   b"mx.example.com; spf=pass", b" (c) MX.example.com; x",
                                   b' "mx.example.com"; dkim=pass', b"from x ([192.0.2.250])"]),
                  authres_values().map(lambda v: v[0]))),
        max_size=12).map(tuple),
    body=st.lists(st.one_of(nasty_bytes, mime_bodies()), max_size=4).map(tuple),
    queue_id=st.one_of(st.just("4QxYz1Abc"), nasty_text),
)

_RUNTIME: Runtime | None = None


# SPF, DKIM and DMARC run on every handled message: against a local DNS server that
# knows no name, so a conversation never waits on the network.
_DNS = DnsServer()


def _runtime() -> Runtime:
    global _RUNTIME
    if _RUNTIME is None or not os.path.isdir(_RUNTIME.spool.root):
        if not _DNS.port:
            _DNS.start()
        dns = f"scan:\n  dns: {{nameservers: ['{_DNS.address}'], timeout: 1}}\n"
        path = _file("session.yaml", (SESSION_CONFIG + dns).encode())
        _RUNTIME = Runtime(Engine(load(path)), Spool(os.path.join(scratch(), "milter-spool")),
                           MilterMetrics(CollectorRegistry()))
    return _RUNTIME


def _edge(session: Session, stage: str, call: Callable[[], Any], *, noreply: bool) -> Any:
    """What MxrulesMilter's _edge does with an exception (milter/adapter.py)."""
    try:
        return call()
    except Exception as exc:
        target_by_name["session"].note(f"edge error at {stage}: {type(exc).__name__}")
        if noreply:
            session.deferred_error(stage, exc)
            return None
        return session.error(stage, exc)


def check_session(c: Conversation) -> None:
    """Never a 250 without a job: every CONTINUE at EOM for a handled message is in incoming/."""
    rt = _runtime()
    for state in ("tmp", "incoming"):
        shutil.rmtree(os.path.join(rt.spool.root, state), ignore_errors=True)
    rt.spool.ensure()
    session = Session(rt, "fuzz")
    reply = _edge(session, "connect", lambda: session.connect(c.client, "host.test"),
                  noreply=False)
    if reply.verb != "continue":
        assert reply.code.startswith(("4", "5"))
        target_by_name["session"].note("connect refused")
        return
    _edge(session, "helo", lambda: session.helo(c.helo, "TLSv1.3" if c.tls else "", ""),
          noreply=True)
    reply = _edge(session, "mail", lambda: session.mail(c.sender, {}), noreply=False)
    if reply.verb != "continue":
        target_by_name["session"].note("mail refused")
        return
    accepted = []
    for rcpt in c.rcpts:
        reply = _edge(session, "rcpt", lambda r=rcpt: session.rcpt(r, tls=c.tls), noreply=False)
        if reply.verb == "continue":
            accepted.append(rcpt)
        else:
            assert reply.code[:1] in ("4", "5") and "\n" not in str(reply)
    if not accepted:  # Postfix sends no DATA; the session ends
        _edge(session, "abort", session.abort, noreply=False)
        assert os.listdir(os.path.join(rt.spool.root, "tmp")) == []
        target_by_name["session"].note("no recipient")
        return
    handled = bool(session.msg is not None and session.msg.handled)
    expected = b""
    for name, value in c.headers:
        _edge(session, "header", lambda n=name, v=value: session.header(n, v), noreply=True)
        if not authres.forged(name, value, "mx.example.com"):
            expected += (name.encode("utf-8", "surrogateescape") + b":"
                         + value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n")
    _edge(session, "eoh", session.eoh, noreply=True)
    expected += b"\r\n"
    for chunk in c.body:
        _edge(session, "body", lambda ch=chunk: session.body(ch), noreply=True)
        expected += chunk
    result = _edge(session, "eom", lambda: session.eom(c.queue_id), noreply=False)
    reply = result.reply if isinstance(result, EomResult) else result
    incoming = rt.spool.ids("incoming")
    assert os.listdir(os.path.join(rt.spool.root, "tmp")) == [], "a reception was left in tmp/"
    if reply.verb != "continue":
        assert reply.code[:1] in ("4", "5") and incoming == []
        target_by_name["session"].note(f"eom {reply.code} {reply.text[:48]}")
        return
    assert isinstance(result, EomResult)
    if not handled:
        assert incoming == [] and result.message_id == ""
        target_by_name["session"].note("eom passed (not ours)")
        return
    # 250 for a message mxrules handles: its job must be in the spool, intact.
    assert incoming == [result.message_id], (incoming, result)
    job = rt.spool.load("incoming", result.message_id)
    with open(rt.spool.message_path("incoming", result.message_id), "rb") as fh:
        stored = fh.read()
    assert stored == expected
    assert (job.message_size, job.message_sha256) == (len(stored),
                                                      hashlib.sha256(stored).hexdigest())
    for name, value in result.add_headers:
        assert "\r" not in value and "\n" not in value and "\x00" not in value, (name, value)
    target_by_name["session"].note("eom 250 spooled")


# -- DKIM without the whole message: header block and streamed body hash ------------

# Bytes rich in what canonicalization cares about: spaces, tabs, bare CR and LF, CRLF.
dkim_bodies = st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"x", b"\xff",
                                        b": ", b"From: a\r\n"]),
                       max_size=200).map(b"".join)


def check_dkim_body(args: tuple[bytes, int]) -> None:
    """The header block and the streamed canonical bodies are what dkimpy gets from it all."""
    import re

    import dkim
    from dkim.canonicalization import Relaxed, Simple

    data, chunk = args
    with open(_file("dkim", data), "rb") as fh:
        head = read_head(fh, limit=1 << 20)
    assert data.startswith(head.block) and head.body_offset == len(head.block)

    def parse(text: bytes) -> tuple[list[Any], bytes] | None:
        try:
            return dkim.rfc822_parse(text)  # type: ignore[no-any-return]
        except (dkim.MessageFormatError, IndexError):  # a junk header line
            return None

    whole, part = parse(data), parse(head.block)
    assert (whole is None) == (part is None), "dkimpy refuses one and not the other"
    if whole is None or part is None:
        return
    headers, body = whole
    assert part[0] == headers
    assert body == b"\r\n".join(re.split(b"\r?\n", data[head.body_offset:]))
    for algorithm in (Simple, Relaxed):
        out: list[bytes] = []
        canon = BodyCanon(algorithm is Relaxed, [out.append])
        for i in range(0, len(data) - head.body_offset, chunk):
            canon.feed(data[head.body_offset + i:head.body_offset + i + chunk])
        canon.close()
        assert b"".join(out) == algorithm.canonicalize_body(body), algorithm.name


# A RequestResponse Lambda's reply (the function has run: no reply may fail the action).
STOPS = ("STOP_RULE", "STOP_RULE_SET")


def _meant(value: Any) -> str:
    """What a shallow, parsed reply means (deep ones are built knowing it)."""
    word = value.get("disposition") if isinstance(value, dict) else None
    return word.upper() if isinstance(word, str) and word.upper() in STOPS else "CONTINUE"


@st.composite
def lambda_replies(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """(reply bytes, the disposition it means, or None when any disposition will do)."""
    kind = draw(st.sampled_from(["known", "deep", "value", "bytes"]))
    if kind == "known":
        word = draw(st.sampled_from([*STOPS, "CONTINUE", "stop_rule", "Stop_Rule_Set", "STOP",
                                     "", "STOP_RULE "]))
        body = {**draw(st.dictionaries(nasty_text, json_values, max_size=3)),
                "disposition": word}
        return json.dumps(body).encode(), _meant(body)
    if kind == "deep":
        depth = draw(st.sampled_from([2, 999, 1000, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"disposition":', b"}")]))
        cut = draw(st.booleans())
        # Nested two deep or more, the top-level disposition is never a string.
        return opener * depth + b'"STOP_RULE"' + closer * (depth // 2 if cut else depth), \
            "CONTINUE"
    if kind == "value":
        value = draw(json_values)
        return json.dumps(value).encode(), _meant(value)
    return draw(nasty_bytes), None


def check_disposition(reply: tuple[bytes, str | None]) -> None:
    raw, meant = reply
    got = disposition_of(raw)
    assert got in ("CONTINUE", *STOPS)
    if meant is not None:
        assert got == meant, (raw[:80], got, meant)
    target_by_name["disposition"].note(got)


TARGETS = [
    Target("headers", "payload.parse_headers -> commonHeaders, mail object, JSON",
           header_blocks() | nasty_bytes, check_headers, weight=1.5),
    Target("header_block", "header-block readers (payload, bounce) on message files",
           st.tuples(st.one_of(messages(), nasty_bytes), st.sampled_from([1, 10, 100, 1 << 20])),
           check_header_block, weight=1.0),
    Target("message", "whole MIME messages -> stored copy, SNS/Lambda JSON, DSN",
           messages(), check_message, weight=0.5),
    Target("dsn", "build_dsn with hostile job, action, recipients and headers",
           dsn_inputs, check_dsn, weight=1.5),
    Target("address", "address and client-address parsing, matching, Received",
           addresses, check_address, weight=2.0),
    Target("received", "Received from clauses: never an address the client wrote",
           received_values(), check_received, weight=1.5),
    Target("ses", "SES JSON exports (rule set, filters) through config.load",
           ses_exports(), check_ses, weight=0.5),
    Target("config", "config.load on hostile YAML (bad values, injection, nesting)",
           config_texts(), check_config, weight=0.4),
    Target("spool", "job.json decoding and the worker's claim of a damaged job",
           job_files(), check_job, weight=2.0),
    Target("session", "milter Session: no 250 without a spooled, intact job",
           conversations, check_session, weight=1.5),
    Target("dkim_body", "DKIM header block and streamed body hash against dkimpy's",
           st.tuples(st.one_of(messages(), nasty_bytes, dkim_bodies), st.integers(1, 70)),
           check_dkim_body, weight=1.0),
    Target("disposition", "a RequestResponse Lambda reply -> its disposition, never an error",
           lambda_replies(), check_disposition, weight=1.0),
    Target("authres", "authserv-id of an incoming Authentication-Results (comments, quotes)",
           authres_values(), check_authres, weight=1.0),
]
target_by_name = {t.name: t for t in TARGETS}


def prepare() -> None:
    """Build what the targets share (needs a scratch directory)."""
    global ADDRESS_ENGINE
    ADDRESS_ENGINE = _address_engine()
    # Errors the adapter would log (and turn into 451) are counted in the notes instead.
    _LOG_LEVEL[:] = [logging.getLogger("mxrules").level]
    logging.getLogger("mxrules").setLevel(logging.CRITICAL)


_LOG_LEVEL: list[int] = []


def run_one(target: Target, value: Any) -> None:
    """One input through one target, under the time bound."""
    with time_bound():
        target.check(value)


__all__ = ["TARGETS", "Hang", "Target", "cleanup", "prepare", "run_one"]
