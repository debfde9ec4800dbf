"""SES payloads: golden shapes from SES's documented examples, exact values for ours.

The golden files in golden/ are the JSON examples of the SES developer guide
(`receiving-email-action-lambda-event.md`, `receiving-email-notifications-examples.md`),
unwrapped: the guide breaks long strings for reading, real JSON does not.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from harness.jobs import make_job
from mxrules import payload
from mxrules.headblock import header_lines
from mxrules.payload import (
    HEADERS_LIMIT,
    SUBJECT,
    StoredCopy,
    action_object,
    common_headers,
    destination,
    lambda_event,
    mail_object,
    notification,
    notification_json,
    object_key,
    parse_headers,
    receipt_object,
    ses_prepended_headers,
    sns_encoding,
    split_addresses,
    stored_copy_headers,
    stored_copy_prefix,
)
from mxrules.rules import (
    Action,
    AddHeaderAction,
    BounceAction,
    LambdaAction,
    Rule,
    S3Action,
    SNSAction,
    StopAction,
)
from mxrules.spool import Client, Job, MatchedRule

GOLDEN = Path(__file__).parent / "golden"
MESSAGE_ID = "0123456789abcdefghijklmnopqrstuv01234567"
TOPIC = "arn:aws:sns:us-east-1:123456789012:IncomingEmail"
FUNCTION = "arn:aws:lambda:us-east-1:123456789012:function:IncomingEmail"
ALL_PASS = {"spam": "PASS", "virus": "PASS", "spf": "PASS", "dkim": "PASS", "dmarc": "GRAY"}

MESSAGE = (
    b"Received: from relay.example.net (relay.example.net [198.51.100.7])\r\n"
    b"\tby mail.example.net with ESMTPS id 57F83A2042\r\n"
    b"\tfor <info@example.com>; Wed, 31 Dec 2025 23:59:58 +0000 (UTC)\r\n"
    b'From: "Doe, John" <sender@example.net>\r\n'
    b'To: "info@example.com" <info@example.com>\r\n'
    b"Subject: This is a test\r\n"
    b"Date: Wed, 31 Dec 2025 23:59:57 +0000\r\n"
    b"Message-ID: <F8098FDD@example.net>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative;\r\n"
    b' boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nH\xc3\xa9llo \xff\r\n--b1--\r\n"
)


def _rule(*actions: Action, name: str = "store") -> Rule:
    return Rule(name=name, enabled=True, actions=actions)


def _job(data: bytes = MESSAGE, **changes: Any) -> Job:
    fields: dict[str, Any] = dict(
        message_id=MESSAGE_ID,
        received_at="2026-01-01T00:00:00.123Z",
        recipients=("info@example.com", "sales@example.com"),
        client=Client(address="192.0.2.1", hostname="mail.example.net", helo="mail.example.net",
                      tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384"),
        verdicts=dict(ALL_PASS),
    )
    fields.update(changes)
    return make_job(data, **fields)


def _message(tmp_path: Path, data: bytes = MESSAGE) -> str:
    path = tmp_path / "message"
    path.write_bytes(data)
    return str(path)


def _golden(name: str) -> Any:
    return json.loads((GOLDEN / name).read_text(encoding="utf-8"))


def _shape(value: Any) -> Any:
    """JSON types, recursively: same keys (in order), same types, same list element shapes."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return sorted({json.dumps(_shape(item)) for item in value})
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    assert value is None, f"not a JSON value: {value!r}"
    return "null"


def _ordered(shape: Any) -> str:
    return json.dumps(shape)


def _unordered(shape: Any) -> str:
    return json.dumps(shape, sort_keys=True)


def _payload_inputs(tmp_path: Path, job: Job,
                    added: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    headers, truncated = stored_copy_headers(job, _message(tmp_path), added)
    return {"headers": headers, "truncated": truncated, "processing_ms": 1205}


# -- golden: SES's documented examples -------------------------------------------


def test_lambda_event_has_the_documented_shape_and_key_order(tmp_path: Path) -> None:
    action = LambdaAction(function_arn=FUNCTION, invocation_type="Event")
    matched = MatchedRule(_rule(action), ("info@example.com",))
    job = _job(rules=(matched,))
    ours = lambda_event(job, matched, action, **_payload_inputs(tmp_path, job))
    golden = _golden("lambda_event_lambda_action.json")
    assert _ordered(_shape(ours)) == _ordered(_shape(golden))


def test_sns_base64_notification_has_the_documented_shape_and_key_order(
        tmp_path: Path) -> None:
    action = SNSAction(topic_arn=TOPIC, encoding="Base64")
    matched = MatchedRule(_rule(action), ("info@example.com",))
    job = _job(rules=(matched,))
    copy = StoredCopy(job, _message(tmp_path))
    ours = notification(job, matched, action, **_payload_inputs(tmp_path, job),
                        content=copy.read_all())
    golden = _golden("notification_sns_base64.json")
    assert _ordered(_shape(ours)) == _ordered(_shape(golden))
    assert ours["receipt"]["action"] == {"type": "SNS", "topicArn": TOPIC, "encoding": "BASE64"}


@pytest.mark.parametrize(
    ("golden_file", "action"),
    [
        pytest.param("notification_sns_utf8_2015.json",
                     SNSAction(topic_arn=TOPIC, encoding="UTF-8"), id="sns-utf8"),
        pytest.param("notification_s3_alert_2015.json",
                     S3Action(topic_arn=TOPIC, bucket_name="my-S3-bucket"), id="s3-alert"),
    ],
)
def test_2015_examples_match_but_for_fields_ses_added_since(
        tmp_path: Path, golden_file: str, action: Action) -> None:
    """The 2015 examples predate dmarcVerdict, the SNS `encoding` field and the S3
    action's `objectKeyPrefix` (present, `""` when empty, in SES's output since)."""
    matched = MatchedRule(_rule(action), ("info@example.com",))
    job = _job(rules=(matched,))
    content = StoredCopy(job, _message(tmp_path)).read_all() if action.TYPE == "SNS" else None
    ours = notification(job, matched, action, **_payload_inputs(tmp_path, job), content=content)
    golden = _golden(golden_file)
    golden["receipt"]["dmarcVerdict"] = {"status": "GRAY"}
    if action.TYPE == "SNS":
        golden["receipt"]["action"]["encoding"] = "UTF8"
    if action.TYPE == "S3":
        golden["receipt"]["action"]["objectKeyPrefix"] = ""
    assert _unordered(_shape(ours)) == _unordered(_shape(golden))


@pytest.mark.parametrize(
    ("prefix", "key"),
    [
        pytest.param(None, "ID", id="none"),
        pytest.param("", "ID", id="empty"),
        pytest.param("inbox", "inbox/ID", id="folder-without-slash"),
        pytest.param("inbox/", "inbox/ID", id="folder-with-slash"),
        pytest.param("email/produccion/inbox", "email/produccion/inbox/ID", id="nested"),
    ],
)
def test_s3_prefix_is_a_folder(prefix: str | None, key: str) -> None:
    action = S3Action(bucket_name="b", object_key_prefix=prefix)
    job = _job(rules=(MatchedRule(_rule(action), ("info@example.com",)),))
    want = key.replace("ID", job.message_id)
    assert object_key(job, action) == want
    assert action_object(job, action) == {
        "type": "S3", "bucketName": "b", "objectKeyPrefix": prefix or "", "objectKey": want}


@pytest.mark.parametrize(
    ("golden_file", "anonymised_apart"),
    [
        # The guide anonymised these two differently in `headers` and in `content`.
        pytest.param("notification_sns_base64.json", {"DKIM-Signature", "Feedback-ID"},
                     id="2019-base64"),
        pytest.param("notification_sns_utf8_2015.json", {"Return-Path"}, id="2015-utf8"),
    ],
)
def test_header_unfolding_matches_ses(golden_file: str, anonymised_apart: set[str]) -> None:
    """`mail.headers` is `content`'s header block unfolded: SES's rule, reproduced."""
    golden = _golden(golden_file)
    raw = golden["content"].encode("utf-8")
    if golden["receipt"]["action"].get("encoding") == "BASE64":
        raw = base64.b64decode(raw)
    ours = [{"name": n, "value": v} for n, v in parse_headers(raw)
            if n not in anonymised_apart]
    documented = [h for h in golden["mail"]["headers"] if h["name"] not in anonymised_apart]
    assert ours == documented


SES_RECEIVED = re.compile(
    r"from (?P<helo>\S+) \((?P<rdns>\S+) \[(?P<ip>[^\]]+)\]\) by (?P<by>\S+) with SMTP"
    r" id (?P<id>\S+) for (?P<rcpt>\S+); (?P<date>\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2})"
    r" \+0000 \(UTC\)")
SES_RECEIVED_WIRE = re.compile(
    rb"Received: from \S+ \(\S+ \[[^\]]+\]\)\r\n by \S+ with SMTP id \S+\r\n for \S+;\r\n"
    rb" \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000 \(UTC\)\r\n")


@pytest.mark.parametrize("golden_file", ["notification_sns_base64.json",
                                         "notification_sns_utf8_2015.json",
                                         "notification_s3_alert_2015.json"])
def test_received_header_has_the_documented_shape(golden_file: str) -> None:
    documented = next(h["value"] for h in _golden(golden_file)["mail"]["headers"]
                      if h["name"] == "Received")
    assert SES_RECEIVED.fullmatch(documented)
    ours = dict(ses_prepended_headers(_job()))["Received"]
    assert SES_RECEIVED.fullmatch(ours)


def test_received_header_is_folded_as_in_ses_content() -> None:
    golden = _golden("notification_sns_utf8_2015.json")
    assert SES_RECEIVED_WIRE.search(golden["content"].encode())
    assert SES_RECEIVED_WIRE.search(stored_copy_prefix(_job()))


# -- the headers SES prepends ------------------------------------------------------


def test_received_header_exact() -> None:
    headers = ses_prepended_headers(_job())
    assert headers[:2] == [
        ("Return-Path", "<sender@example.net>"),
        ("Received", f"from mail.example.net (mail.example.net [192.0.2.1]) by mx.example.com"
                     f" with SMTP id {MESSAGE_ID} for info@example.com;"
                     f" Thu, 01 Jan 2026 00:00:00 +0000 (UTC)"),
    ]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        pytest.param(Client(address="192.0.2.1", hostname="mail.example.net", helo="mail"),
                     "from mail (mail.example.net [192.0.2.1]) by", id="no-tls-still-smtp"),
        pytest.param(Client(address="192.0.2.1", hostname="", helo="mail"),
                     "from mail (unknown [192.0.2.1]) by", id="no-reverse-name"),
        pytest.param(Client(address="192.0.2.1", hostname="unknown", helo=""),
                     "from unknown (unknown [192.0.2.1]) by", id="no-helo"),
        pytest.param(Client(address="2001:db8::1", hostname="v6.example.net", helo="v6"),
                     "from v6 (v6.example.net [IPv6:2001:db8::1]) by", id="ipv6"),
    ],
)
def test_received_header_client_part(client: Client, expected: str) -> None:
    received = dict(ses_prepended_headers(_job(client=client)))["Received"]
    assert received.startswith(expected)
    assert " with SMTP id " in received


@pytest.mark.parametrize(
    ("verdicts", "auth", "names"),
    [
        pytest.param({}, (), ["Return-Path", "Received"], id="unscanned"),
        pytest.param({"spam": "DISABLED", "virus": "DISABLED"}, (),
                     ["Return-Path", "Received"], id="disabled"),
        pytest.param({"spam": "PASS", "virus": "FAIL"}, (),
                     ["Return-Path", "Received", "X-SES-Spam-Verdict", "X-SES-Virus-Verdict"],
                     id="scanned"),
        pytest.param({"virus": "PROCESSING_FAILED"}, (),
                     ["Return-Path", "Received", "X-SES-Virus-Verdict"], id="virus-only"),
        pytest.param({"spam": "GRAY", "virus": "PASS"},
                     (("Received-SPF", "pass (x)"), ("Authentication-Results", "mx; spf=pass")),
                     ["Return-Path", "Received", "X-SES-Spam-Verdict", "X-SES-Virus-Verdict",
                      "Received-SPF", "Authentication-Results"], id="with-auth-hook"),
    ],
)
def test_prepended_headers_order(verdicts: dict[str, str], auth: tuple[tuple[str, str], ...],
                                 names: list[str]) -> None:
    headers = ses_prepended_headers(_job(verdicts=verdicts, auth_headers=auth))
    assert [name for name, _ in headers] == names
    assert dict(headers).get("X-SES-Spam-Verdict", verdicts.get("spam", "DISABLED")) == \
        verdicts.get("spam", "DISABLED")


def test_null_sender() -> None:
    job = _job(mail_from="")
    assert ses_prepended_headers(job)[0] == ("Return-Path", "<>")
    mail = mail_object(job, ses_prepended_headers(job), truncated=False)
    assert mail["source"] == ""
    assert mail["commonHeaders"]["returnPath"] == ""


def test_stored_copy_prefix_exact() -> None:
    job = _job(verdicts={"spam": "PASS", "virus": "PASS"})
    added = (("X-Rule", "störe ✓"), ("X-Second", "2"))
    assert stored_copy_prefix(job, added) == (
        b"Return-Path: <sender@example.net>\r\n"
        b"Received: from mail.example.net (mail.example.net [192.0.2.1])\r\n"
        b" by mx.example.com with SMTP id " + MESSAGE_ID.encode() + b"\r\n"
        b" for info@example.com;\r\n"
        b" Thu, 01 Jan 2026 00:00:00 +0000 (UTC)\r\n"
        b"X-SES-Spam-Verdict: PASS\r\n"
        b"X-SES-Virus-Verdict: PASS\r\n"
        b"X-Rule: st\xc3\xb6re \xe2\x9c\x93\r\n"
        b"X-Second: 2\r\n")


def test_prefix_parses_back_to_the_headers_mail_lists() -> None:
    job = _job()
    added = (("X-Rule", "a"), ("X-Rule", "b"))
    assert parse_headers(stored_copy_prefix(job, added)) == \
        ses_prepended_headers(job) + list(added)


def test_line_breaks_in_values_never_start_a_header() -> None:
    job = _job(client=Client(address="192.0.2.1", hostname="h", helo="evil\r\nX-Injected: 1"))
    prefix = stored_copy_prefix(job, (("X-Rule", "a\r\nBcc: victim@example.org"),))
    names = [name for name, _ in parse_headers(prefix)]
    assert names == ["Return-Path", "Received", "X-SES-Spam-Verdict", "X-SES-Virus-Verdict",
                     "X-Rule"]


# -- the stored copy -------------------------------------------------------------


def test_stored_copy_is_prefix_then_message(tmp_path: Path) -> None:
    job = _job()
    added = (("X-Rule", "1"),)
    copy = StoredCopy(job, _message(tmp_path), added)
    expected = stored_copy_prefix(job, added) + MESSAGE
    assert len(copy) == copy.size == len(expected)
    assert copy.read_all() == expected
    assert copy.read() == expected
    assert copy.read() == b""


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096, 1 << 20])
def test_stored_copy_streams_in_chunks(tmp_path: Path, chunk: int) -> None:
    body = bytes(random.Random(chunk).getrandbits(8) for _ in range(200_000))
    data = MESSAGE + body
    job = _job(data=data)
    with StoredCopy(job, _message(tmp_path, data)) as copy:
        parts = []
        while part := copy.read(chunk):
            assert len(part) <= chunk
            parts.append(part)
        assert b"".join(parts) == stored_copy_prefix(job) + data
        assert copy.tell() == copy.size


def test_stored_copy_seek_and_tell(tmp_path: Path) -> None:
    job = _job()
    copy = StoredCopy(job, _message(tmp_path))
    expected = stored_copy_prefix(job) + MESSAGE
    head = len(stored_copy_prefix(job))
    for where in (0, 5, head - 3, head, head + 10, len(expected) - 1, len(expected),
                  len(expected) + 5):
        assert copy.seek(where) == where
        assert copy.tell() == where
        assert copy.read(20) == expected[where:where + 20]
    copy.seek(-10, io.SEEK_END)
    assert copy.read() == expected[-10:]
    copy.seek(head - 2)
    copy.seek(4, io.SEEK_CUR)
    assert copy.read(3) == expected[head + 2:head + 5]
    copy.seek(0)  # what botocore does before a retry
    assert copy.read() == expected
    with pytest.raises(ValueError):
        copy.seek(-1)
    with pytest.raises(ValueError):
        copy.seek(0, 7)
    assert copy.readable() and copy.seekable() and not copy.writable()
    copy.close()
    with pytest.raises(ValueError):
        copy.read(1)


def test_stored_copy_works_through_a_buffered_reader(tmp_path: Path) -> None:
    job = _job()
    with io.BufferedReader(StoredCopy(job, _message(tmp_path))) as fh:
        assert fh.read() == stored_copy_prefix(job) + MESSAGE


# -- reading and parsing the message's headers -------------------------------------


def test_read_header_block_stops_at_the_empty_line(tmp_path: Path) -> None:
    block, _capped = header_lines(_message(tmp_path))
    assert block == MESSAGE.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert b"--b1" not in block


@pytest.mark.parametrize(
    ("data", "block", "capped"),
    [
        pytest.param(b"A: 1\nB: 2\n\nbody: x\n", b"A: 1\nB: 2\n", False, id="lf-only"),
        pytest.param(b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n", False, id="no-body"),
        pytest.param(b"A: 1\r\nB: 2", b"A: 1\r\nB: 2", False, id="no-final-newline"),
        pytest.param(b"", b"", False, id="empty"),
        pytest.param(b"\r\nbody: x\r\n", b"", False, id="no-headers"),
        pytest.param(b"A: 1\r\n" * 10, b"A: 1\r\n" * 4, True, id="capped-at-line-end"),
        pytest.param(b"A: 1\r\n" * 4 + b"\r\nbody", b"A: 1\r\n" * 4, False, id="cap-at-end"),
        pytest.param(b"A: 123456789012345678901234567890\r\n\r\n",
                     b"A: 123456789012345678901", True, id="capped-mid-line"),
    ],
)
def test_read_header_block_edges(tmp_path: Path, data: bytes, block: bytes,
                                 capped: bool) -> None:
    path = _message(tmp_path, data)
    assert header_lines(path, limit=24) == (block, capped)
    headers, truncated = stored_copy_headers(_job(), path, limit=24)
    assert truncated is capped
    assert headers[len(ses_prepended_headers(_job())):] == parse_headers(block)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        pytest.param(b"A: b\r\n  c \r\n\tfold\r\n", [("A", "b c  fold")], id="unfold-like-ses"),
        pytest.param(b"X-MS-Has-Attach:\r\nY:   \r\n", [("X-MS-Has-Attach", ""), ("Y", "")],
                     id="empty-values"),
        pytest.param(b"From sender Mon Jan  1 00:00:00 2026\r\nA: 1\r\n", [("A", "1")],
                     id="mbox-from-line"),
        pytest.param(b" leading continuation\r\nA: 1\r\n", [("A", "1")], id="leading-fold"),
        pytest.param(b"no colon here\r\n folded too\r\nA: 1\r\n", [("A", "1")],
                     id="no-colon"),
        pytest.param(b": no name\r\nBad Name: x\r\n\x00N: x\r\nA : 1\r\n", [("A", "1")],
                     id="bad-names"),
        pytest.param(b"S: caf\xe9\r\nT: caf\xc3\xa9\r\n", [("S", "café"), ("T", "café")],
                     id="latin1-fallback-and-utf8"),
        pytest.param(b"A: x\x00y\r\n", [("A", "x\x00y")], id="nul-in-value"),
        pytest.param(b"A: 1\r\n\r\nB: 2\r\n", [("A", "1")], id="stops-at-body"),
        pytest.param(b"A: 1\n\nB: 2\n", [("A", "1")], id="stops-at-body-lf"),
        pytest.param(b"A:1:2\r\n", [("A", "1:2")], id="colon-in-value"),
    ],
)
def test_parse_headers(block: bytes, expected: list[tuple[str, str]]) -> None:
    assert parse_headers(block) == expected


def test_parse_headers_long_lines_and_many_headers() -> None:
    long_value = "v" * 5000
    block = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(10_000))
    block += b"Long: " + long_value.encode() + b"\r\n"
    headers = parse_headers(block)
    assert len(headers) == 10_001
    assert headers[0] == ("X-H0", "0")
    assert headers[-1] == ("Long", long_value)


@pytest.mark.parametrize("seed", range(20))
def test_hostile_headers_never_raise(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    alphabet = b"\x00\x01\t\n\r :;,<>\"()\\@=?ab\x80\xa0\xc3\xff"
    junk = bytes(rng.choice(alphabet) for _ in range(4000))
    data = b"To: " + junk + b"\r\nCc: " + junk[::-1] + b"\r\n" + junk + b"\r\n\r\nbody"
    action = SNSAction(topic_arn=TOPIC, encoding="UTF-8")
    matched = MatchedRule(_rule(action), ("info@example.com",))
    job = _job(data=data)
    path = _message(tmp_path, data)
    headers, truncated = stored_copy_headers(job, path)
    text = notification_json(job, matched, action, headers=headers, truncated=truncated,
                             processing_ms=1, content=StoredCopy(job, path).read_all())
    text.encode("utf-8")  # every string is real text, no lone surrogates
    assert json.loads(text)["mail"]["messageId"] == MESSAGE_ID


# -- mail ------------------------------------------------------------------------


def test_mail_object_fields(tmp_path: Path) -> None:
    job = _job()
    added = (("X-Rule", "1"),)
    headers, truncated = stored_copy_headers(job, _message(tmp_path), added)
    mail = mail_object(job, headers, truncated=truncated)
    assert list(mail) == ["timestamp", "source", "messageId", "destination",
                          "headersTruncated", "headers", "commonHeaders"]
    assert mail["timestamp"] == "2026-01-01T00:00:00.123Z"
    assert mail["source"] == "sender@example.net"
    assert mail["messageId"] == MESSAGE_ID
    assert mail["headersTruncated"] is False
    names = [h["name"] for h in mail["headers"]]
    assert names[:6] == ["Return-Path", "Received", "X-SES-Spam-Verdict",
                         "X-SES-Virus-Verdict", "X-Rule", "Received"]
    assert mail["headers"][-1] == {"name": "Content-Type",
                                   "value": 'multipart/alternative; boundary="b1"'}
    assert mail["commonHeaders"] == {
        "returnPath": "sender@example.net",
        "from": ['"Doe, John" <sender@example.net>'],
        "date": "Wed, 31 Dec 2025 23:59:57 +0000",
        "to": ['"info@example.com" <info@example.com>'],
        "messageId": "<F8098FDD@example.net>",
        "subject": "This is a test",
    }


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([("To", '"Doe, John" <a@x.example>, b@y.example'), ("Cc", "c@z.example"),
                      ("Bcc", "d@w.example"), ("From", "e@v.example")],
                     ["a@x.example", "b@y.example", "c@z.example"], id="to-and-cc"),
        pytest.param([("cc", "c@z.example"), ("TO", "a@x.example")],
                     ["c@z.example", "a@x.example"], id="header-order-any-case"),
        pytest.param([("To", "a@x.example"), ("To", "b@y.example")],
                     ["a@x.example", "b@y.example"], id="repeated-header"),
        pytest.param([("To", "undisclosed-recipients:;")], [], id="empty-group"),
        pytest.param([("To", "Team: a@x.example, b@y.example;")],
                     ["a@x.example", "b@y.example"], id="group"),
        pytest.param([("Subject", "x")], [], id="none"),
        pytest.param([("To", '<<<"\\'), ("Cc", "ok@z.example")], ["ok@z.example"],
                     id="garbage-beside-good"),
    ],
)
def test_destination(headers: list[tuple[str, str]], expected: list[str]) -> None:
    assert destination(headers) == expected


def test_common_headers_only_present_ones() -> None:
    assert common_headers([("From", "a@x.example"), ("Subject", "hi")]) == {
        "from": ["a@x.example"], "subject": "hi"}
    assert common_headers([("X-Other", "1")]) == {}


def test_common_headers_all_fields_types_and_order() -> None:
    headers = [("Subject", "first"), ("Message-ID", "<m@x>"), ("Bcc", "h@x"), ("Cc", "g@x"),
               ("To", "e@x, f@x"), ("Date", "Thu, 1 Jan 2026 00:00:00 +0000"),
               ("Reply-To", "d@x"), ("Sender", "c@x"), ("From", "A <a@x>, b@x"),
               ("Return-Path", "<r@x>"), ("Subject", "second"), ("To", "z@x")]
    common = common_headers(headers)
    assert list(common) == ["returnPath", "from", "sender", "replyTo", "date", "to", "cc",
                            "bcc", "messageId", "subject"]
    assert common == {
        "returnPath": "r@x", "from": ["A <a@x>", "b@x"], "sender": "c@x", "replyTo": ["d@x"],
        "date": "Thu, 1 Jan 2026 00:00:00 +0000", "to": ["e@x", "f@x", "z@x"],
        "cc": ["g@x"], "bcc": ["h@x"], "messageId": "<m@x>", "subject": "first",
    }


@pytest.mark.parametrize(
    ("value", "items"),
    [
        pytest.param('"Doe, John" <a@x>, b@y', ['"Doe, John" <a@x>', "b@y"], id="quoted-comma"),
        pytest.param("b@y (Doe, John), c@z", ["b@y (Doe, John)", "c@z"], id="comment-comma"),
        pytest.param('"a\\", b" <a@x>', ['"a\\", b" <a@x>'], id="escaped-quote"),
        pytest.param("<a,b@x>, c@z", ["<a,b@x>", "c@z"], id="angle-comma"),
        pytest.param("Team: a@x, b@y;, c@z", ["Team: a@x, b@y;", "c@z"], id="group"),
        pytest.param(" , ,", [], id="empty-items"),
        pytest.param('"unterminated, x', ['"unterminated, x'], id="unterminated"),
    ],
)
def test_split_addresses(value: str, items: list[str]) -> None:
    assert split_addresses(value) == items


def _sized(total: int) -> list[tuple[str, str]]:
    """Headers whose names and values add up to exactly `total` bytes (SES's count)."""
    pads = [("X-Pad", "p" * 95)] * (total // 100 - 1)  # 5 + 95 = 100 bytes each
    return [*pads, ("X-End", "e" * (total - 100 * len(pads) - 5))]


@pytest.mark.parametrize(("total", "cut"), [(HEADERS_LIMIT, False), (HEADERS_LIMIT + 1, True)])
def test_headers_truncated_at_10_kb(total: int, cut: bool) -> None:
    headers = _sized(total)
    assert sum(len(n) + len(v) for n, v in headers) == total
    mail = mail_object(_job(), headers, truncated=False)
    assert mail["headersTruncated"] is cut
    kept = [(h["name"], h["value"]) for h in mail["headers"]]
    assert kept == (headers[:-1] if cut else headers)


def test_truncation_keeps_whole_headers_and_common_headers_from_all(tmp_path: Path) -> None:
    data = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 200) for i in range(100)) + MESSAGE
    job = _job(data=data)
    headers, capped = stored_copy_headers(job, _message(tmp_path, data))
    assert not capped
    mail = mail_object(job, headers, truncated=capped)
    assert mail["headersTruncated"] is True
    kept = [(h["name"], h["value"]) for h in mail["headers"]]
    assert kept == headers[:len(kept)]
    assert sum(len(n.encode()) + len(v.encode()) for n, v in kept) <= HEADERS_LIMIT
    assert sum(len(n.encode()) + len(v.encode())
               for n, v in headers[:len(kept) + 1]) > HEADERS_LIMIT
    assert mail["commonHeaders"]["subject"] == "This is a test"  # past the cut
    assert mail["destination"] == ["info@example.com"]


def test_capped_read_is_reported_as_truncated(tmp_path: Path) -> None:
    job = _job()
    headers, capped = stored_copy_headers(job, _message(tmp_path), limit=40)
    assert capped
    assert mail_object(job, headers, truncated=capped)["headersTruncated"] is True


# -- receipt ---------------------------------------------------------------------


def test_receipt_object_fields_and_order() -> None:
    action = StopAction()
    matched = MatchedRule(_rule(action), ("info@example.com",))
    receipt = receipt_object(_job(), matched, action, processing_ms=42)
    assert receipt == {
        "timestamp": "2026-01-01T00:00:00.123Z",
        "processingTimeMillis": 42,
        "recipients": ["info@example.com"],
        "spamVerdict": {"status": "PASS"},
        "virusVerdict": {"status": "PASS"},
        "spfVerdict": {"status": "PASS"},
        "dkimVerdict": {"status": "PASS"},
        "dmarcVerdict": {"status": "GRAY"},
        "action": {"type": "Stop"},
    }
    assert list(receipt) == ["timestamp", "processingTimeMillis", "recipients", "spamVerdict",
                             "virusVerdict", "spfVerdict", "dkimVerdict", "dmarcVerdict",
                             "action"]


def test_recipients_are_per_rule() -> None:
    first, second = S3Action(bucket_name="b"), StopAction()
    rules = (MatchedRule(_rule(first, name="a"), ("info@example.com", "sales@example.com")),
             MatchedRule(_rule(second, name="b"), ("sales@example.com",)))
    job = _job(rules=rules)
    assert receipt_object(job, rules[0], first, processing_ms=1)["recipients"] == \
        ["info@example.com", "sales@example.com"]
    assert receipt_object(job, rules[1], second, processing_ms=1)["recipients"] == \
        ["sales@example.com"]


@pytest.mark.parametrize(
    ("verdicts", "statuses", "policy"),
    [
        pytest.param({}, ["DISABLED"] * 5, None, id="unscanned"),
        pytest.param({"dmarc": "FAIL", "dmarc_policy": "reject"},
                     ["DISABLED"] * 4 + ["FAIL"], "reject", id="dmarc-fail-policy"),
        pytest.param({"dmarc": "FAIL"}, ["DISABLED"] * 4 + ["FAIL"], None,
                     id="dmarc-fail-no-policy"),
        pytest.param({"dmarc": "PASS", "dmarc_policy": "reject"},
                     ["DISABLED"] * 4 + ["PASS"], None, id="dmarc-pass-with-policy"),
        pytest.param({"spam": "fail", "virus": "PROCESSING_FAILED", "spf": "GRAY"},
                     ["FAIL", "PROCESSING_FAILED", "GRAY", "DISABLED", "DISABLED"], None,
                     id="mixed"),
    ],
)
def test_verdicts(verdicts: dict[str, str], statuses: list[str], policy: str | None) -> None:
    action = StopAction()
    receipt = receipt_object(_job(verdicts=verdicts), MatchedRule(_rule(action), ()), action,
                             processing_ms=0)
    assert [receipt[k]["status"] for k in ("spamVerdict", "virusVerdict", "spfVerdict",
                                           "dkimVerdict", "dmarcVerdict")] == statuses
    assert receipt.get("dmarcPolicy") == policy
    if policy:
        assert list(receipt)[-2:] == ["dmarcPolicy", "action"]


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        pytest.param(S3Action(bucket_name="bucket"),
                     {"type": "S3", "bucketName": "bucket", "objectKeyPrefix": "",
                      "objectKey": MESSAGE_ID},
                     id="s3-no-prefix"),
        pytest.param(S3Action(bucket_name="bucket", object_key_prefix="in/", topic_arn=TOPIC,
                              kms_key_arn="arn:aws:kms:us-east-1:1:key/k"),
                     {"type": "S3", "topicArn": TOPIC, "bucketName": "bucket",
                      "objectKeyPrefix": "in/", "objectKey": "in/" + MESSAGE_ID},
                     id="s3-prefix-and-topic"),
        pytest.param(S3Action(bucket_name="bucket", object_key_prefix="mail"),
                     {"type": "S3", "bucketName": "bucket", "objectKeyPrefix": "mail",
                      "objectKey": "mail/" + MESSAGE_ID}, id="s3-prefix-is-a-folder"),
        pytest.param(SNSAction(topic_arn=TOPIC),
                     {"type": "SNS", "topicArn": TOPIC, "encoding": "UTF8"}, id="sns-utf8"),
        pytest.param(SNSAction(topic_arn=TOPIC, encoding="Base64"),
                     {"type": "SNS", "topicArn": TOPIC, "encoding": "BASE64"}, id="sns-base64"),
        pytest.param(LambdaAction(function_arn=FUNCTION),
                     {"type": "Lambda", "functionArn": FUNCTION, "invocationType": "Event"},
                     id="lambda"),
        pytest.param(LambdaAction(function_arn=FUNCTION, invocation_type="RequestResponse",
                                  topic_arn=TOPIC),
                     {"type": "Lambda", "topicArn": TOPIC, "functionArn": FUNCTION,
                      "invocationType": "RequestResponse"}, id="lambda-topic"),
        pytest.param(BounceAction(smtp_reply_code="550", status_code="5.1.1",
                                  message="Mailbox does not exist",
                                  sender="postmaster@example.com", topic_arn=TOPIC),
                     {"type": "Bounce", "topicArn": TOPIC, "smtpReplyCode": "550",
                      "statusCode": "5.1.1", "message": "Mailbox does not exist",
                      "sender": "postmaster@example.com"}, id="bounce"),
        pytest.param(BounceAction(smtp_reply_code="550", message="No",
                                  sender="postmaster@example.com"),
                     {"type": "Bounce", "smtpReplyCode": "550", "message": "No",
                      "sender": "postmaster@example.com"}, id="bounce-no-status"),
        pytest.param(StopAction(topic_arn=TOPIC), {"type": "Stop", "topicArn": TOPIC},
                     id="stop-topic"),
        pytest.param(AddHeaderAction(header_name="X-Rule", header_value="v"),
                     {"type": "AddHeader", "headerName": "X-Rule", "headerValue": "v"},
                     id="add-header"),
    ],
)
def test_action_object(action: Action, expected: dict[str, Any]) -> None:
    ours = action_object(_job(), action)
    assert ours == expected
    assert list(ours) == list(expected)


@pytest.mark.parametrize(("given", "ses"), [("UTF-8", "UTF8"), ("utf-8", "UTF8"),
                                            ("UTF8", "UTF8"), ("Base64", "BASE64"),
                                            ("BASE64", "BASE64")])
def test_sns_encoding_spelling(given: str, ses: str) -> None:
    assert sns_encoding(given) == ses


def test_unknown_sns_encoding() -> None:
    with pytest.raises(ValueError):
        sns_encoding("latin-1")


# -- whole payloads --------------------------------------------------------------


def _sns(tmp_path: Path, encoding: str, data: bytes = MESSAGE,
         added: tuple[tuple[str, str], ...] = ()) -> tuple[dict[str, Any], bytes]:
    action = SNSAction(topic_arn=TOPIC, encoding=encoding)
    matched = MatchedRule(_rule(action), ("info@example.com",))
    job = _job(data=data, rules=(matched,))
    path = _message(tmp_path, data)
    stored = StoredCopy(job, path, added).read_all()
    headers, truncated = stored_copy_headers(job, path, added)
    body = notification(job, matched, action, headers=headers, truncated=truncated,
                        processing_ms=7, content=stored)
    return body, stored


def test_base64_content_is_exactly_the_stored_copy(tmp_path: Path) -> None:
    body, stored = _sns(tmp_path, "Base64", added=(("X-Rule", "1"),))
    assert "\n" not in body["content"]
    assert base64.b64decode(body["content"], validate=True) == stored
    assert stored.startswith(b"Return-Path: <sender@example.net>\r\n")
    assert stored.endswith(MESSAGE)
    assert b"X-Rule: 1\r\n" + MESSAGE in stored


def test_utf8_content_is_the_stored_copy_as_text(tmp_path: Path) -> None:
    body, stored = _sns(tmp_path, "UTF-8")
    assert body["content"] == stored.decode("utf-8", errors="replace")
    assert body["content"].endswith("Héllo \ufffd\r\n--b1--\r\n")


def test_notification_key_order_and_json(tmp_path: Path) -> None:
    body, _stored = _sns(tmp_path, "UTF-8")
    assert list(body) == ["notificationType", "mail", "receipt", "content"]
    assert body["notificationType"] == "Received"
    action = SNSAction(topic_arn=TOPIC)
    matched = MatchedRule(_rule(action), ("info@example.com",))
    job = _job(rules=(matched,))
    kwargs = {**_payload_inputs(tmp_path, job), "content": MESSAGE}
    text = notification_json(job, matched, action, **kwargs)
    assert text.startswith('{"notificationType":"Received","mail":{"timestamp":')
    assert text == json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    assert "Héllo" in text  # non-ASCII as is, like SES
    assert json.loads(text) == notification(job, matched, action, **kwargs)
    assert SUBJECT == "Amazon SES Email Receipt Notification"


def test_alert_notification_has_no_content(tmp_path: Path) -> None:
    action = S3Action(bucket_name="bucket", topic_arn=TOPIC)
    matched = MatchedRule(_rule(action), ("info@example.com",))
    job = _job(rules=(matched,))
    body = notification(job, matched, action, **_payload_inputs(tmp_path, job))
    assert list(body) == ["notificationType", "mail", "receipt"]
    with pytest.raises(ValueError):
        notification(job, matched, action, **_payload_inputs(tmp_path, job), content=b"x")


def test_lambda_event_has_no_content(tmp_path: Path) -> None:
    action = LambdaAction(function_arn=FUNCTION)
    matched = MatchedRule(_rule(action), ("info@example.com",))
    job = _job(rules=(matched,))
    event = lambda_event(job, matched, action, **_payload_inputs(tmp_path, job))
    (record,) = event["Records"]
    assert list(record) == ["eventSource", "eventVersion", "ses"]
    assert record["eventSource"] == "aws:ses" and record["eventVersion"] == "1.0"
    assert list(record["ses"]) == ["mail", "receipt"]
    assert "content" not in json.dumps(event)


def test_scanned_job_carries_verdicts_policy_and_auth_headers_in_ses_order(tmp_path: Path) -> None:
    """Scans land in every payload and stored copy: verdict headers, then auth headers."""
    auth = (("Received-SPF", "fail (mx.example.com: domain of example.net does not designate "
                             "192.0.2.1 as permitted sender) client-ip=192.0.2.1;"),
            ("Authentication-Results", "mx.example.com; spf=fail smtp.mailfrom=example.net; "
                                       "dkim=none; dmarc=fail (p=reject) header.from=example.net"))
    verdicts = {"spam": "FAIL", "virus": "PASS", "spf": "FAIL", "dkim": "GRAY",
                "dmarc": "FAIL", "dmarc_policy": "reject"}
    sns = SNSAction(topic_arn="arn:aws:sns:us-east-1:123456789012:t", encoding="Base64")
    lam = LambdaAction(function_arn="arn:aws:lambda:us-east-1:123456789012:function:f")
    matched = MatchedRule(_rule(sns, lam), ("info@example.com",))
    job = _job(verdicts=verdicts, auth_headers=auth, rules=(matched,))
    path = _message(tmp_path)
    headers, truncated = payload.stored_copy_headers(job, path)
    names = [n for n, _ in headers]
    assert names[:6] == ["Return-Path", "Received", "X-SES-Spam-Verdict", "X-SES-Virus-Verdict",
                         "Received-SPF", "Authentication-Results"]
    copy = payload.StoredCopy(job, path).read_all()
    assert b"\r\nX-SES-Spam-Verdict: FAIL\r\nX-SES-Virus-Verdict: PASS\r\nReceived-SPF: fail" \
        in copy
    for action in (sns, lam):
        receipt = payload.receipt_object(job, matched, action, processing_ms=5)
        assert receipt["spamVerdict"] == {"status": "FAIL"}
        assert receipt["spfVerdict"] == {"status": "FAIL"}
        assert receipt["dkimVerdict"] == {"status": "GRAY"}
        assert receipt["dmarcVerdict"] == {"status": "FAIL"}
        assert receipt["dmarcPolicy"] == "reject"
        assert list(receipt)[-2:] == ["dmarcPolicy", "action"]  # SES's key order
    event = payload.lambda_event(job, matched, lam, headers=headers, truncated=truncated,
                                 processing_ms=5)
    mail_headers = event["Records"][0]["ses"]["mail"]["headers"]
    assert {"name": "X-SES-Spam-Verdict", "value": "FAIL"} in mail_headers


# -- payloads always fit SNS's and Lambda's 256 KB ----------------------------------------

def _compact(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


@pytest.mark.parametrize(
    ("items", "limit", "kept"),
    [
        pytest.param(["a@b.c", "d@e.f"], 100, 2, id="all-fit"),
        pytest.param(["a@b.c", "d@e.f"], len('["a@b.c","d@e.f"]'), 2, id="exactly"),
        pytest.param(["a@b.c", "d@e.f"], len('["a@b.c","d@e.f"]') - 1, 1, id="one-byte-short"),
        pytest.param(["x" * 100, "a@b.c"], 50, 0, id="whole-items-only-in-order"),
        pytest.param(['"quoted"@b.c'], len('["\\"quoted\\"@b.c"]'), 1, id="escapes-counted"),
        pytest.param([], 2, 0, id="empty"),
    ],
)
def test_cap_list(items: list[str], limit: int, kept: int) -> None:
    capped = payload.cap_list(items, limit)
    assert capped == items[:kept]
    assert _compact(capped) <= limit


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        pytest.param("Hello", 7, "Hello", id="fits"),
        pytest.param("Hello", 6, "Hell", id="cut"),
        pytest.param("héllo", 5, "hé", id="counted-in-utf8-bytes"),
        pytest.param("a\x01b", 8, "a", id="escape-never-split"),
        pytest.param("✓✓", 4, "", id="nothing-fits"),
    ],
)
def test_cap_text(value: str, limit: int, expected: str) -> None:
    assert payload.cap_text(value, limit) == expected
    assert _compact(expected) <= limit


def _many_cc(count: int) -> list[tuple[str, str]]:
    return [("From", "a@sender.test"), ("To", "user@example.com"),
            *[("Cc", ", ".join(f"{n}@c.test" for n in range(i, i + 1000)))
              for i in range(0, count, 1000)],
            ("Subject", "x" * 5000)]


def test_mail_object_caps_the_fields_built_from_the_headers() -> None:
    headers = _many_cc(10_000)
    mail = mail_object(_job(), headers, truncated=False)
    dest = mail["destination"]
    assert dest == ["user@example.com", *(f"{n}@c.test" for n in range(len(dest) - 1))]
    assert payload.DESTINATION_LIMIT - 14 < _compact(dest) <= payload.DESTINATION_LIMIT
    common = mail["commonHeaders"]
    assert common["cc"] == [f"{n}@c.test" for n in range(len(common["cc"]))]
    assert payload.ADDRESS_LIST_LIMIT - 14 < _compact(common["cc"]) <= payload.ADDRESS_LIST_LIMIT
    assert common["subject"] == "x" * (payload.TEXT_LIMIT - 2)
    assert common["to"] == ["user@example.com"] and common["from"] == ["a@sender.test"]
    assert mail["headersTruncated"] is True  # SES's 10 KB of headers


def _fitted(tmp_path: Path, data: bytes, headers: list[tuple[str, str]], encoding: str,
            limit: int = payload.NOTIFICATION_LIMIT) -> tuple[str, dict[str, Any]]:
    action = SNSAction(topic_arn=TOPIC, encoding=encoding)
    matched = MatchedRule(_rule(action), ("info@example.com",))
    text = notification_json(_job(data=data), matched, action, headers=headers,
                             truncated=False, processing_ms=1, content=data, limit=limit)
    return text, json.loads(text)


@pytest.mark.parametrize("headers", [
    pytest.param(_many_cc(10_000), id="10000-cc"),
    pytest.param([(f"X-{n}", "") for n in range(3000)], id="thousands-of-tiny-headers"),
    pytest.param([("X-C", "\x01" * 900)] * 11, id="control-characters"),
])
def test_a_150_kb_base64_notification_fits_whatever_the_headers(
        tmp_path: Path, headers: list[tuple[str, str]]) -> None:
    data = b"x" * (150 * 1024)
    text, note = _fitted(tmp_path, data, headers, "Base64")
    assert len(text.encode()) <= payload.NOTIFICATION_LIMIT
    assert base64.b64decode(note["content"]) == data
    assert note["mail"]["headersTruncated"] is True


def test_fitting_drops_headers_from_the_end_only_as_needed(tmp_path: Path) -> None:
    headers = [(f"X-{n}", "v" * 50) for n in range(100)]
    full, _ = _fitted(tmp_path, b"x", headers, "UTF-8", limit=10**6)
    limit = len(full.encode()) - 200
    text, note = _fitted(tmp_path, b"x", headers, "UTF-8", limit=limit)
    kept = note["mail"]["headers"]
    assert kept == [{"name": f"X-{n}", "value": "v" * 50} for n in range(len(kept))]
    assert limit - 70 < len(text.encode()) <= limit  # one header is about 70 bytes
    assert note["mail"]["headersTruncated"] is True


def test_a_payload_that_cannot_fit_raises(tmp_path: Path) -> None:
    data = b"\x01" * (150 * 1024)  # six bytes each in JSON (\u0001)
    with pytest.raises(payload.PayloadTooLarge) as caught:
        _fitted(tmp_path, data, [], "UTF-8")
    assert caught.value.size > caught.value.limit == payload.NOTIFICATION_LIMIT


def test_lambda_event_json_is_fitted_too() -> None:
    action = LambdaAction(function_arn=FUNCTION)
    matched = MatchedRule(_rule(action), ("info@example.com",))
    headers = [(f"X-{n}", "") for n in range(3000)]
    text = payload.lambda_event_json(_job(), matched, action, headers=headers,
                                     truncated=False, processing_ms=1, limit=20_000)
    assert len(text.encode()) <= 20_000
    assert json.loads(text)["Records"][0]["ses"]["mail"]["headersTruncated"] is True


@pytest.mark.parametrize("client", [
    pytest.param(Client("192.0.2.1", "mail.example.net", "helo.example.net"), id="named"),
    pytest.param(Client("2001:db8::1"), id="ipv6-unknown"),
])
def test_prefix_floor_is_the_prefix_without_scan_headers(client: Client) -> None:
    job = _job(client=client, recipients=("info@example.com",), verdicts={})
    floor = payload.prefix_floor(job.mail_from, client, job.hostname, "info@example.com")
    assert floor == len(stored_copy_prefix(job))
    scanned = _job(client=client, recipients=("info@example.com",), verdicts=dict(ALL_PASS),
                   auth_headers=(("Authentication-Results", "mx.example.com; spf=pass"),))
    assert floor < len(stored_copy_prefix(scanned))


@pytest.mark.parametrize("limit", [2, 20, 100, 10 * 1024, 10**7])
def test_destination_parsing_stops_only_where_the_cap_would_cut(limit: int) -> None:
    headers = _many_cc(10_000)
    assert (payload.cap_list(destination(headers, limit), limit)
            == payload.cap_list(destination(headers), limit))
