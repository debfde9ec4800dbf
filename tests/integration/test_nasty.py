"""Nasty real-world messages through real Postfix, the milter, the worker and moto.

The corpus is built in code (NASTY below): 8-bit headers, NUL bytes, lines of
998+ characters, 10,000 headers, MIME nested 200 deep, malformed addresses in
headers and in the envelope, header injection attempts through the HELO name,
XCLIENT attributes and header values, broken base64, a missing boundary,
Content-Type garbage, a 100 KB header.  Each goes in over a raw SMTP socket (so
8-bit and odd bytes reach Postfix as they are) and must end one of two ways:

- a clear SMTP refusal (4xx/5xx from Postfix or the milter), and then nothing
  is stored; or
- 250, and then exactly one new S3 object holds mxrules' headers followed by
  the message as sent, and the S3 action's SNS notification and the Lambda
  event are valid JSON naming that messageId.

The milter must survive all of them: an ordinary message afterwards is
accepted and stored, and its log holds no traceback.  A config whose
AddHeader value holds CR, LF, NUL or another control character is refused by
`mxrules check-config` (exit 78, file:line), so no header can be injected from
the config either, nor one that libmilter cannot take.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.moto import MotoServer
from harness.mxrules_proc import MXRULES, MilterProcess, WorkerProcess
from harness.ports import free_port
from harness.sink import SmtpSink
from harness.smtp import CRLF, Raw
from harness.stack import write_config
from mxrules.spool import STATES, Spool

pytestmark = pytest.mark.postfix

ADDED = b"X-Nasty-Test: added"


# -- the corpus ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    message: bytes
    sender: bytes = b"a@sender.test"
    rcpts: tuple[bytes, ...] = (b"user@example.com",)
    helo: bytes = b"client.test"
    xclient: bytes = b""  # more XCLIENT attributes (xtext), sent before MAIL
    mail_params: bytes = b""
    # Postfix rewrites the content on its way to the milter (see the case): only
    # the body is compared then.
    exact: bool = True
    # What the milter can see, when the milter protocol itself loses bytes.
    seen: bytes | None = None
    cut: bytes = b""  # a header Postfix cuts short before the milter sees it


def _msg(headers: list[bytes], body: bytes = b"Hello.\r\n") -> bytes:
    base = [b"From: <a@sender.test>", b"To: <user@example.com>", b"Subject: nasty",
            b"Date: Sat, 28 Nov 2026 10:00:00 +0000", b"Message-ID: <nasty@sender.test>"]
    return CRLF.join(base + headers) + CRLF + CRLF + body


def _nested(levels: int) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for i in range(levels):
        body = (f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n'
                f"--b{i}\r\n").encode() + body + f"\r\n--b{i}--\r\n".encode()
    return body


NASTY = [
    Case("8bit-headers", _msg([b"X-Latin1: caf\xe9", b"X-Utf8: \xe2\x82\xac \xf0\x9f\x92\xa9",
                               b"Reply-To: J\xfcrgen <j@sender.test>"],
                              b"caf\xe9 \xff\xfe\r\n")),
    Case("8bit-subject-and-from", _msg([], b"x\r\n").replace(
        b"Subject: nasty", b"Subject: \xc3\xa9t\xc3\xa9 \xe9t\xe9").replace(
        b"From: <a@sender.test>", b"From: \xd0\x98\xd0\xb2\xd0\xb0\xd0\xbd <a@sender.test>")),
    # The milter protocol passes header values as C strings: a NUL ends the value
    # there, before mxrules sees it.  The body reaches it whole.
    Case("nul-bytes", _msg([b"X-Nul: a\x00b"], b"before\x00after\r\n\x00\r\n"),
         seen=_msg([b"X-Nul: a"], b"before\x00after\r\n\x00\r\n")),
    Case("line-999", _msg([b"X-Long: " + b"a" * 991], b"b" * 999 + CRLF)),
    Case("line-5000", _msg([], b"c" * 5000 + CRLF), exact=False),
    Case("10000-headers", _msg([b"X-H-%05d: value %d" % (i, i) for i in range(10_000)])),
    Case("mime-200-deep", _msg([b"MIME-Version: 1.0"]).split(CRLF + CRLF)[0] + CRLF
         + _nested(200)),
    Case("broken-base64", _msg([b"MIME-Version: 1.0", b"Content-Type: text/plain",
                                b"Content-Transfer-Encoding: base64"],
                               b"SGVsbG8gd29ybGQ!!!*&^%\r\n====\r\nQQ\r\n")),
    Case("missing-boundary", _msg([b"MIME-Version: 1.0", b"Content-Type: multipart/mixed"],
                                  b"--\r\nno boundary here\r\n--x--\r\n")),
    Case("boundary-never-closed", _msg([b"MIME-Version: 1.0",
                                        b'Content-Type: multipart/mixed; boundary="zz"'],
                                       b"--zz\r\nContent-Type: text/plain\r\n\r\nopen\r\n")),
    Case("content-type-garbage", _msg([b"Content-Type: ;;;===\"\"\"/// \x01\x02; boundary",
                                       b"Content-Transfer-Encoding: \xff\xfe"])),
    # Postfix 3.7 hands a milter about the first 60,000 bytes of one header (observed;
    # header_size_limit is 102,400): the rest never reaches mxrules.
    Case("header-100kb", _msg([b"Subject-Long: " + b"s" * 100_000]), cut=b"Subject-Long"),
    Case("header-100kb-folded", _msg([b"X-Folded: " + (b"word " * 40 + CRLF + b" ") * 500]),
         cut=b"X-Folded"),
    # Postfix's cleanup re-writes address headers it can parse (quoting, @myorigin
    # for a bare local part) before any milter sees them: the body is compared.
    Case("malformed-header-addresses", exact=False, message=_msg([
        b"Cc: <<<>>>, @@@, \"unterminated <x@y>, (comment (nested) a@b",
        b"Bcc: undisclosed-recipients:;", b"Sender: ,,,,", b"Reply-To: <@route:a@b>",
        b"Return-Path: <evil@x>\r\nX-Injected-By-Return-Path: yes"]).replace(
        b"To: <user@example.com>", b"To: user@example.com@evil.test, \"a\r\n b\"@example.com")),
    # Postfix ends a line at a bare LF (so "Bcc:" becomes a header of its own, which
    # Postfix removes) and hands the milter a bare CR in a header as a space.
    Case("header-injection-in-values", _msg([
        b"X-Inject: a\rBcc: bare-cr@evil.test", b"X-Inject2: a\nBcc: bare-lf@evil.test"]),
         seen=_msg([b"X-Inject: a Bcc: bare-cr@evil.test", b"X-Inject2: a"])),
    Case("no-headers", b"\r\njust a body\r\n", exact=False),
    Case("helo-injection", _msg([]), helo=b"a.test\tX-Injected: yes"),
    Case("xclient-helo-crlf", _msg([]), xclient=b"HELO=evil+0D+0ABcc:+20x@evil.test"),
    Case("xclient-name-crlf", _msg([]), xclient=b"NAME=evil+0D+0AX-Injected:+20yes.test"),
    Case("quoted-local-part", _msg([]), rcpts=(b'"a b"@example.com',)),
    Case("route-and-percent", _msg([]), rcpts=(b"@route.test:user@example.com",
                                               b"user%other.test@example.com")),
    Case("envelope-8bit-no-smtputf8", _msg([]), sender=b"s\xe9@sender.test",
         rcpts=(b"us\xe9r@example.com",)),
    Case("envelope-not-utf8-with-smtputf8", _msg([]), sender=b"s\xff@sender.test",
         rcpts=(b"u\xff@example.com",), mail_params=b" SMTPUTF8"),
    Case("envelope-utf8-smtputf8", _msg([]), sender=b"s\xc3\xa9@sender.test",
         rcpts=(b"\xc3\xbcser@example.com",), mail_params=b" SMTPUTF8"),
    Case("envelope-garbage", _msg([]), sender=b"<<>>",
         rcpts=(b"user@@example.com", b"user@example.com>", b"<user@example.com")),
    Case("envelope-null-sender", _msg([]), sender=b""),
]


@dataclass
class Outcome:
    replies: list[tuple[bytes, int, bytes]]
    final: int  # the reply to end of data, or the refusal that ended the session

    def describe(self) -> str:
        return "\n".join(f"{step!r} -> {code} {text!r}" for step, code, text in self.replies)


def deliver(port: int, case: Case) -> Outcome:
    raw = Raw(port)
    replies: list[tuple[bytes, int, bytes]] = [(b"greeting", *raw.greeting)]
    try:
        # As an Internet client (XCLIENT): Postfix rewrites the headers of local
        # clients' mail (local_header_rewrite_clients), not of mail from outside.
        steps = [b"EHLO " + case.helo,
                 b"XCLIENT ADDR=203.0.113.9 NAME=[UNAVAILABLE] " + case.xclient,
                 b"EHLO " + case.helo]
        steps.append(b"MAIL FROM:<" + case.sender + b">" + case.mail_params)
        for step in steps:
            code, text = raw.cmd(step)
            replies.append((step, code, text))
            if code >= 400 or code < 0:
                return Outcome(replies, code)
        accepted = 0
        for rcpt in case.rcpts:
            step = b"RCPT TO:<" + rcpt + b">"
            code, text = raw.cmd(step)
            replies.append((step, code, text))
            accepted += 200 <= code < 300
        if not accepted:
            return Outcome(replies, code)
        code, text = raw.data(case.message)
        replies.append((b"DATA", code, text))
        return Outcome(replies, code)
    finally:
        raw.close()


# -- the stack ---------------------------------------------------------------------------


@dataclass
class Loop:
    dir: Path
    moto: MotoServer
    milter: MilterProcess
    worker: WorkerProcess
    port: int
    spool: Spool
    bucket: str
    queue: str
    topic: str
    function: str

    def keys(self) -> list[str]:
        return self.moto.s3_keys(self.bucket, "nasty/")

    def wait_idle(self, timeout: float = 30) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            counts = {s: len(self.spool.ids(s)) for s in STATES}
            tmp = self.spool.ids("tmp")
            if counts["incoming"] == counts["active"] == counts["deferred"] == 0 and not tmp:
                return counts
            if time.monotonic() > deadline:
                raise TimeoutError(f"spool not idle: {counts}\n{self.worker.log()[-3000:]}")
            time.sleep(0.05)


@pytest.fixture
def loop(moto_server: MotoServer, postfix_factory: Any, smtp_sink: SmtpSink,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    directory = tmp_path_factory.mktemp("nasty")
    bucket = moto_server.make_bucket("nasty-bucket")
    topic, queue = moto_server.make_topic_with_queue("nasty-topic")
    function = moto_server.make_function("nasty-fn")
    rules = [{"name": "everything", "enabled": True, "recipients": ["example.com"],
              "actions": [
                  {"add_header": {"header_name": "X-Nasty-Test", "header_value": "added"}},
                  {"s3": {"bucket_name": bucket, "object_key_prefix": "nasty/",
                          "topic_arn": topic}},
                  {"lambda": {"function_arn": function, "invocation_type": "Event"}}]}]
    milter_port, worker_port = free_port(), free_port()
    path = write_config(
        directory, port=milter_port, rules=rules, filters=[],
        metrics={"milter_listen": "", "worker_listen": f"127.0.0.1:{worker_port}"},
        aws={"region": "us-east-1", "endpoint_url": moto_server.endpoint_url,
             "connect_timeout": 1, "read_timeout": 5},
        worker={"threads": 2, "scan_interval": 0.05, "retry_initial_delay": 0.05,
                "retry_max_delay": 0.5, "drain_timeout": 10})
    milter = MilterProcess(path, milter_port, directory / "milter.log")
    worker = WorkerProcess(path, worker_port, directory / "worker.log",
                           env=moto_server.aws_env())
    try:
        milter.start()
        worker.start()
        postfix = postfix_factory(milter=milter.postfix_spec, relay_port=smtp_sink.port,
                                  extra={"smtputf8_enable": "yes"})
        yield Loop(directory, moto_server, milter, worker, postfix.smtp_port,
                   Spool(str(directory / "spool")), bucket, queue, topic, function)
    finally:
        worker.stop()
        milter.stop()


# -- the checks ----------------------------------------------------------------------


def _prepended_fields(stored: bytes) -> list[bytes]:
    """The field names mxrules put before the message in a stored copy."""
    end = stored.index(CRLF + ADDED + CRLF) + len(CRLF + ADDED + CRLF)
    lines = stored[:end - 2].split(CRLF)
    return [line.split(b":", 1)[0] for line in lines if not line.startswith((b" ", b"\t"))]


def _check_stored(loop: Loop, case: Case, key: str, outcome: Outcome) -> str:
    stored, _meta = loop.moto.s3_object(loop.bucket, key)
    message_id = key.removeprefix("nasty/")
    # mxrules' own fields (SPF/DKIM/DMARC run on every message, on the hostile HELO
    # and envelope too), and nothing a sender smuggled in among them.
    assert _prepended_fields(stored) == [b"Return-Path", b"Received", b"Received-SPF",
                                         b"Authentication-Results", b"X-Nasty-Test"], (
        case.name, stored[:600])
    assert f"id {message_id}".encode() in stored
    copy = stored[stored.index(CRLF + ADDED + CRLF) + len(CRLF + ADDED + CRLF):]
    if case.cut:
        head, _, body = copy.partition(CRLF + CRLF)
        want_head, _, want_body = case.message.partition(CRLF + CRLF)
        assert body == want_body
        [got] = [f for f in head.split(CRLF + case.cut + b":")[1:]]
        [want] = [f for f in want_head.split(CRLF + case.cut + b":")[1:]]
        assert 50_000 <= len(got) < len(want) and want.startswith(got), (case.name, len(got))
        assert head.split(CRLF + case.cut + b":")[0] == want_head.split(
            CRLF + case.cut + b":")[0]
    elif case.exact:
        assert copy == (case.seen or case.message), (case.name, outcome.describe(), copy[:300])
    else:
        body = (case.message[2:] if case.message.startswith(CRLF)
                else case.message.split(CRLF + CRLF, 1)[1])
        assert copy.replace(CRLF, b"").endswith(body.replace(CRLF, b"")), (case.name,
                                                                             copy[-300:])
    return message_id


def _check_payloads(loop: Loop, accepted: dict[str, str]) -> None:
    """Every accepted message: one S3 notification and one Lambda event, valid JSON."""
    notes = loop.moto.sns_messages(loop.queue, len(accepted), timeout=20)
    seen = {}
    for envelope in notes:
        note = json.loads(envelope["Message"])  # raises on invalid JSON
        assert note["notificationType"] == "Received"
        assert note["receipt"]["action"]["type"] == "S3"
        seen[note["mail"]["messageId"]] = note
    assert set(seen) == set(accepted.values())
    events = {}
    for call in loop.moto.lambda_invocations("nasty-fn"):
        event = call.json()
        ses = event["Records"][0]["ses"]
        events[ses["mail"]["messageId"]] = ses
    assert set(events) == set(accepted.values())
    for ses in events.values():
        assert ses["mail"]["headersTruncated"] in (True, False)
        json.dumps(ses, ensure_ascii=False).encode("utf-8")  # real text, no lone surrogates


def test_nasty_messages_are_refused_clearly_or_stored_intact(loop: Loop) -> None:
    accepted: dict[str, str] = {}
    refused: dict[str, str] = {}
    for case in NASTY:
        before = set(loop.keys())
        outcome = deliver(loop.port, case)
        counts = loop.wait_idle()
        assert counts["failed"] == counts["corrupt"] == 0, (case.name, counts,
                                                            loop.worker.log()[-3000:])
        new = sorted(set(loop.keys()) - before)
        if outcome.final == 250 and any(200 <= c < 300 for s, c, _ in outcome.replies
                                        if s.startswith(b"RCPT")):
            assert len(new) == 1, (case.name, outcome.describe(), new)
            accepted[case.name] = _check_stored(loop, case, new[0], outcome)
        else:
            # A clear refusal: an SMTP code, and nothing stored.
            assert 400 <= outcome.final < 600, (case.name, outcome.describe())
            assert new == [], (case.name, outcome.describe())
            refused[case.name] = outcome.describe().splitlines()[-1]
    _check_payloads(loop, accepted)

    # The milter is alive and well: an ordinary message goes through.
    before = set(loop.keys())
    ordinary = Case("ordinary", _msg([b"X-Ordinary: yes"]))
    assert deliver(loop.port, ordinary).final == 250
    loop.wait_idle()
    [key] = sorted(set(loop.keys()) - before)
    _check_stored(loop, ordinary, key, Outcome([], 250))
    assert loop.milter.proc is not None and loop.milter.proc.poll() is None
    assert "Traceback" not in loop.milter.log()
    assert "Traceback" not in loop.worker.log()
    # Most of the corpus is mail a real MX must take.  Postfix itself refuses
    # envelope addresses that are not UTF-8 (500 5.5.2) and an XCLIENT NAME with
    # a line break (501 5.5.4); everything else is accepted and stored.
    assert set(refused) == {"envelope-8bit-no-smtputf8", "envelope-not-utf8-with-smtputf8",
                            "xclient-name-crlf"}, refused


@pytest.mark.parametrize("value", ["a\r\nBcc: evil@x.test", "a\nX-Injected: yes", "a\r",
                                   "a\x00b", "a\x1b[2J", "a\x7f"],
                         ids=["crlf", "lf", "cr", "nul", "escape", "del"])
def test_add_header_value_with_a_control_character_is_refused_by_the_config_check(
        tmp_path: Path, value: str) -> None:
    rules = [{"name": "r", "enabled": True, "recipients": ["example.com"],
              "actions": [{"add_header": {"header_name": "X-A", "header_value": value}}]}]
    path = write_config(tmp_path, rules=rules, filters=[])
    done = subprocess.run([MXRULES, "check-config", "--config", str(path)], capture_output=True,
                          text=True, env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"},
                          timeout=60)
    assert done.returncode == 78, done
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1)
                if text.strip().startswith("header_value:"))
    assert f"{path}:{line}" in done.stderr + done.stdout, done
    assert "Traceback" not in done.stderr
    assert yaml.safe_load(path.read_text())["rule_sets"]["default"][0]["actions"][0][
        "add_header"]["header_value"] == value  # the file really held the line break
