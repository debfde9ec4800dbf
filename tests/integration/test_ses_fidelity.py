"""What real SES does, through real Postfix + milter + worker + moto (S3, SNS->SQS, Lambda).

Each test sends mail through the whole path and reads back the S3 object and the
notifications SNS delivered to SQS; docs/ses-evidence.md has the SES evidence
each one follows, and the payloads are also handed to the two consumer checks
(tests/harness/consumers.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.consumers import (
    build_go_check,
    go_check,
    require_powertools,
    unexplained_go,
    unexplained_powertools,
)

pytestmark = pytest.mark.postfix

# The actions tests' whole loop (Postfix, milter, worker, moto, sink), reused as is.
_SPEC = importlib.util.spec_from_file_location(
    "mxrules_integration_actions", Path(__file__).with_name("test_actions.py"))
assert _SPEC is not None and _SPEC.loader is not None
_actions = sys.modules.setdefault(_SPEC.name, importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(_actions)
make_loop = _actions.make_loop
Loop = _actions.Loop
GOLDEN = Path(__file__).resolve().parent.parent / "unit" / "golden"
RCPT = "user@example.com"
LIMIT = 10 * 1024


def rules(loop: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": "fidelity", "enabled": True, "recipients": [RCPT], "actions": [
        {"s3": {"bucket_name": loop["bucket"], "object_key_prefix": "in",
                "topic_arn": loop["topic"]}},
        {"sns": {"topic_arn": loop["topic"], "encoding": "UTF-8"}},
        {"lambda": {"function_arn": loop["function"], "invocation_type": "Event"}},
    ]}]


def _deliver(loop: Loop, msg: bytes) -> dict[str, Any]:
    """Send one message; its S3 object, both notifications and the Lambda event."""
    loop.send([RCPT], msg)
    counts = loop.wait_idle()
    assert counts["failed"] == 0, loop.worker.log()[-3000:]
    notes = [json.loads(e["Message"]) for e in loop.moto.sns_messages(loop.queue, 2)]
    by_type = {n["receipt"]["action"]["type"]: n for n in notes}
    key = by_type["S3"]["receipt"]["action"]["objectKey"]
    body, _meta = loop.moto.s3_object(loop.bucket, key)
    event = loop.moto.lambda_invocations("mail-fn")[-1].json()
    return {"s3": body, "S3": by_type["S3"], "SNS": by_type["SNS"], "lambda": event}


def _stored_headers(stored: bytes) -> list[tuple[str, str]]:
    """The stored copy's headers, unfolded as SES lists them (CRLF and WSP -> one space)."""
    block = stored.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    unfolded = re.sub(r"\r\n[ \t]+", " ", block)
    return [(n, v.strip()) for n, _, v in (line.partition(":") for line in unfolded.split("\r\n"))]


def _kept(headers: list[tuple[str, str]], per_header: int) -> int:
    """How many headers fit 10 KB when each counts name + value + `per_header` bytes."""
    total = 0
    for count, (name, value) in enumerate(headers):
        total += len(name.encode()) + len(value.encode()) + per_header
        if total > LIMIT:
            return count
    return len(headers)


def _mails(got: dict[str, Any]) -> list[dict[str, Any]]:
    return [got["S3"]["mail"], got["SNS"]["mail"], got["lambda"]["Records"][0]["ses"]["mail"]]


@pytest.fixture(scope="module")
def go_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_go_check(tmp_path_factory.mktemp("go"))


def _consumers_read(go_binary: Path, got: dict[str, Any]) -> None:
    require_powertools()
    payloads = [got["S3"], got["SNS"], got["lambda"]]
    assert [unexplained_powertools(p) for p in payloads] == [[], [], []]
    clean = {"error": "", "unknown": [], "missing": []}
    assert [unexplained_go(r) for r in go_check(go_binary, payloads)] == [clean] * 3


# -- headersTruncated ------------------------------------------------------------------


def _google_groups_message() -> bytes:
    """The headers of the message in SES's truncated capture, below SES's own, and more.

    The capture lists them unfolded; they are sent one per line.  Small headers
    after them put the 10 KB cut where counting `: ` and CRLF would move it.
    """
    capture = json.loads((GOLDEN / "ses_capture_2024_headers_truncated.json").read_text())
    names = [h["name"] for h in capture["mail"]["headers"]]
    own = names.index("X-SES-DKIM-SIGNATURE") + 1  # what SES wrote above the message
    headers = capture["mail"]["headers"][own:]
    lines = [f"{h['name']}: {h['value']}" for h in headers]
    # mxrules' own Return-Path and Received add about 250 bytes, its Received-SPF
    # and Authentication-Results (every message is authenticated) about 300 more:
    # the cut falls among the small headers, past where `Name: value` CRLF would
    # put it.
    size = sum(len(h["name"].encode()) + len(h["value"].encode()) for h in headers)
    lines.append("X-Pad: " + "p" * (9_700 - size - 5 - 300))
    lines += [f"X-Seq-{i:02d}: {i}" for i in range(60)]
    return ("\r\n".join(lines) + "\r\n\r\nHello.\r\n").encode()


def test_headers_truncated_counts_names_and_values(make_loop: Any, go_binary: Path) -> None:
    loop: Loop = make_loop(rules=rules)
    got = _deliver(loop, _google_groups_message())
    stored = _stored_headers(got["s3"])
    kept = _kept(stored, 0)
    assert kept < len(stored)
    assert _kept(stored, 4) < kept - 10  # `Name: value` CRLF would keep far fewer
    for mail in _mails(got):
        assert mail["headersTruncated"] is True
        assert [(h["name"], h["value"]) for h in mail["headers"]] == stored[:kept]
    _consumers_read(go_binary, got)


# -- commonHeaders: encoded words, re-rendered addresses, sender -----------------------


ENCODED = (
    b"From: =?UTF-8?Q?Jos=C3=A9_P=C3=A9rez?= <jose@sender.test>\r\n"
    b'Sender: "Lista" <lista@sender.test>\r\n'
    b'To: "user@example.com" <user@example.com>\r\n'
    b'Cc: "Plain Name" <cc@example.org>, <bare@example.org>\r\n'
    b"Subject: =?UTF-8?B?Q2Fmw6k=?=\r\n =?ISO-8859-1?Q?_con_leche_=E0_la?= carte\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <enc@sender.test>\r\n"
    b"\r\nHello.\r\n"
)


def test_common_headers_decoded_and_re_rendered(make_loop: Any, go_binary: Path) -> None:
    loop: Loop = make_loop(rules=rules)
    got = _deliver(loop, ENCODED)
    for mail in _mails(got):
        assert mail["commonHeaders"] == {
            "returnPath": "a@sender.test",
            "from": ["José Pérez <jose@sender.test>"],
            "sender": "Lista <lista@sender.test>",  # a string, as SES sends it
            "date": "Sat, 28 Nov 2026 10:00:00 +0000",
            "to": ['"user@example.com" <user@example.com>'],
            "cc": ["Plain Name <cc@example.org>", "bare@example.org"],
            "messageId": "<enc@sender.test>",
            "subject": "Café con leche à la carte",
        }
        listed = dict((h["name"], h["value"]) for h in mail["headers"])
        assert listed["From"] == "José Pérez <jose@sender.test>"
        assert listed["Sender"] == '"Lista" <lista@sender.test>'  # as written
        assert listed["Subject"] == "Café con leche à la carte"
    # The stored copies are the message as received: encoded words stay encoded.
    assert ENCODED.split(b"\r\n\r\n")[0] in got["s3"]
    assert got["SNS"]["content"].encode() == got["s3"]
    _consumers_read(go_binary, got)


def test_empty_address_headers_are_left_out(make_loop: Any, go_binary: Path) -> None:
    loop: Loop = make_loop(rules=rules)
    got = _deliver(loop, b"From: \r\nSender: \r\nTo: user@example.com\r\n"
                         b"Subject: empty\r\n\r\nHello.\r\n")
    for mail in _mails(got):
        common = mail["commonHeaders"]
        assert "from" not in common and "sender" not in common
        assert common["to"] == ["user@example.com"]
    _consumers_read(go_binary, got)


# -- byte-exact stored copies ----------------------------------------------------------


SHAPES = {
    "body": b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: s\r\n\r\nHi\r\n",
    "empty-body": b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: s\r\n\r\n",
    "blank-body": b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: s\r\n\r\n\r\n",
    "headers-only": b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: s\r\n",
}


def _from_first_header(copy: bytes) -> bytes:
    return copy[copy.index(b"From: a@sender.test\r\n"):]


def test_stored_copy_is_postfix_s_copy_but_for_headers_only(make_loop: Any) -> None:
    """Postfix hands the milter "headers, no empty line" and "headers, empty line, no
    body" the same way (header calls, end of headers, no body call: checked against
    Postfix 3.7), but delivers them differently; the stored copy has the empty line.
    """
    loop: Loop = make_loop(rules=rules, delivery="deliver")
    for count, msg in enumerate(SHAPES.values(), start=1):
        got = _deliver(loop, msg)
        [delivered] = loop.sink.wait_for(count)[-1:]
        ours, postfix = _from_first_header(got["s3"]), _from_first_header(delivered.data)
        if b"\r\n\r\n" in msg:
            assert ours == postfix
        else:
            assert ours == postfix + b"\r\n"  # the documented exception
        assert got["SNS"]["content"].encode() == got["s3"]
