"""Every kind of payload mxrules emits, read by two consumers nobody here wrote.

The payloads come from mxrules/payload.py for each action type, Lambda Event
and RequestResponse, SNS UTF-8 and Base64 content, scanned and unscanned
verdicts, and messages without Subject/To/Date, with several From addresses,
non-ASCII and encoded-word headers, a Sender header, an empty From, and more
headers than the 10 KB SES lists.  tests/harness/consumers.py says what each
check proves; tests/integration/test_ses_fidelity.py runs the same checks on
payloads that went through Postfix, the milter, the worker and moto.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from harness.consumers import (
    POWERTOOLS_KNOWN,
    build_go_check,
    go_check,
    powertools_problems,
    require_powertools,
    unexplained_go,
    unexplained_powertools,
)
from harness.jobs import make_job
from mxrules.payload import lambda_event, notification, stored_copy_headers, stored_copy_prefix
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
TOPIC = "arn:aws:sns:us-east-1:123456789012:mail"
FUNCTION = "arn:aws:lambda:us-east-1:123456789012:function:mail"
SCANNED = {"spam": "PASS", "virus": "PASS", "spf": "PASS", "dkim": "GRAY", "dmarc": "FAIL",
           "dmarc_policy": "REJECT"}

BODY = b"\r\nHello.\r\n"
MESSAGES = {
    "plain": b"From: A <a@x.example>\r\nTo: b@y.example\r\nSubject: hi\r\n"
             b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1@x.example>\r\n",
    "bare": b"X-Only: this\r\n",
    "several-from": b"From: a@x.example, \"B, b\" <b@x.example>\r\nFrom: c@x.example\r\n"
                    b"To: d@y.example\r\n",
    "non-ascii": "From: Jos\u00e9 <j@x.example>\r\nTo: \u5c71\u7530 <y@y.example>\r\n"
                 "Subject: caf\u00e9 \u2615\r\n".encode()
                 + b"Cc: =?ISO-8859-1?Q?Andr=E9?= <a@z.example>\r\n"
                   b"Subject: =?UTF-8?B?w6l0w6k=?=\r\nX-Latin1: \xe9t\xe9\r\n",
    "sender": b"From: list member <m@x.example>\r\nSender: \"Group\" <g@x.example>\r\n"
              b"Reply-To: r@x.example\r\nTo: g@x.example\r\nBcc: h@x.example\r\n",
    "empty-from": b"From: \r\nSender: \r\nTo: t@y.example\r\nSubject: \r\n",
    "many-headers": b"".join(b"X-Filler-%03d: %s\r\n" % (i, b"f" * 180) for i in range(80))
                    + b"From: a@x.example\r\nTo: b@y.example\r\n",
}
ACTIONS: dict[str, Action] = {
    "s3": S3Action(bucket_name="mail", object_key_prefix="in", topic_arn=TOPIC),
    "s3-no-prefix": S3Action(bucket_name="mail", topic_arn=TOPIC),
    "sns-utf8": SNSAction(topic_arn=TOPIC, encoding="UTF-8"),
    "sns-base64": SNSAction(topic_arn=TOPIC, encoding="Base64"),
    "lambda-event": LambdaAction(function_arn=FUNCTION, invocation_type="Event"),
    "lambda-requestresponse": LambdaAction(function_arn=FUNCTION,
                                           invocation_type="RequestResponse", topic_arn=TOPIC),
    "bounce": BounceAction(smtp_reply_code="550", status_code="5.1.1", message="gone",
                           sender="mailer@example.com", topic_arn=TOPIC),
    "add-header": AddHeaderAction(header_name="X-Tag", header_value="1", topic_arn=TOPIC),
    "stop": StopAction(topic_arn=TOPIC),
}


def _job(data: bytes, verdicts: dict[str, str]) -> Job:
    return make_job(data, message_id="o3vrnil0e2ic28trm7dfhrc2v0cnbeccl4nbp0g1",
                    queue_id="4Xk2", received_at="2026-01-01T00:00:00.123Z",
                    mail_from="a@x.example", recipients=("b@y.example",),
                    client=Client(address="192.0.2.1", hostname="mail.x.example", helo="x"),
                    hostname="mx.y.example", verdicts=verdicts)


def _payloads(tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for mname, head in MESSAGES.items():
        data = head + BODY + (b"x" * 100_000 + b"\r\n" if mname == "many-headers" else b"")
        path = tmp / f"{mname}.eml"
        path.write_bytes(data)
        for vname, verdicts in (("unscanned", {}), ("scanned", SCANNED)):
            job = _job(data, dict(verdicts))
            for aname, action in ACTIONS.items():
                matched = MatchedRule(Rule(name="r", enabled=True, actions=(action,)),
                                      ("b@y.example",))
                headers, truncated = stored_copy_headers(job, str(path))
                args: dict[str, Any] = {"headers": headers, "truncated": truncated,
                                        "processing_ms": 17}
                if isinstance(action, LambdaAction):
                    body = lambda_event(job, matched, action, **args)
                else:
                    if isinstance(action, SNSAction):
                        args["content"] = stored_copy_prefix(job) + data
                    body = notification(job, matched, action, **args)
                out.append((f"{mname}/{vname}/{aname}", json.loads(json.dumps(body))))
    return out


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, dict[str, Any]]]:
    return _payloads(tmp_path_factory.mktemp("payloads"))


@pytest.fixture(scope="module")
def go_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_go_check(tmp_path_factory.mktemp("go"))


def test_every_kind_is_covered(payloads: list[tuple[str, dict[str, Any]]]) -> None:
    assert len(payloads) == len(MESSAGES) * 2 * len(ACTIONS)
    kinds = {body["Records"][0]["ses"]["receipt"]["action"]["type"] if "Records" in body
             else body["receipt"]["action"]["type"] for _name, body in payloads}
    assert kinds == {"S3", "SNS", "Lambda", "Bounce", "AddHeader", "Stop"}
    assert any(b.get("mail", {}).get("headersTruncated") for _n, b in payloads)
    assert {b["receipt"]["action"].get("encoding") for _n, b in payloads if "receipt" in b} \
        >= {"UTF8", "BASE64"}


def test_aws_lambda_go_reads_every_payload(
        go_binary: Path, payloads: list[tuple[str, dict[str, Any]]]) -> None:
    results = go_check(go_binary, [body for _name, body in payloads])
    clean = {"error": "", "unknown": [], "missing": []}
    bad = {name: unexplained_go(r) for (name, _b), r in zip(payloads, results, strict=True)
           if unexplained_go(r) != clean}
    assert bad == {}


def test_powertools_reads_every_payload(payloads: list[tuple[str, dict[str, Any]]]) -> None:
    require_powertools()
    bad = {name: unexplained_powertools(body) for name, body in payloads
           if unexplained_powertools(body)}
    assert bad == {}


def _ses_golden() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(GOLDEN.glob("*.json")):
        if "2015" in path.name:
            continue  # SES's 2015 examples predate dmarcVerdict
        body = json.loads(path.read_text(encoding="utf-8"))
        body.pop("_source", None)
        out.append((path.name, body))
    return out


def test_known_disagreements_are_ses_s_own(go_binary: Path) -> None:
    """SES's own payloads pass the same checks, and show the Powertools disagreements."""
    require_powertools()
    golden = _ses_golden()
    clean = {"error": "", "unknown": [], "missing": []}
    results = go_check(go_binary, [body for _n, body in golden])
    assert {n: unexplained_go(r) for (n, _b), r in zip(golden, results, strict=True)
            if unexplained_go(r) != clean} == {}
    seen = {p for _n, body in golden for p in powertools_problems(body)}
    assert seen <= POWERTOOLS_KNOWN
    assert ("mail.commonHeaders.sender", "list_type", None) in seen  # SES sends a string
    assert ("mail.commonHeaders.to", "missing", None) in seen
    assert ("mail.commonHeaders.from", "missing", None) in seen


@pytest.mark.parametrize(
    ("where", "value", "go", "powertools"),
    [
        # pydantic's lax mode takes "false" for a bool, Go does not
        pytest.param(("mail", "headersTruncated"), "false", True, False, id="bool-as-string"),
        pytest.param(("mail", "commonHeaders", "from"), "a@x.example", True, True,
                     id="list-as-string"),
        pytest.param(("mail", "timestamp"), "yesterday", True, True, id="timestamp"),
        pytest.param(("receipt", "processingTimeMillis"), 1.5, True, True, id="float-millis"),
        # Go declares a verdict as any string
        pytest.param(("receipt", "spamVerdict"), {"status": "MAYBE"}, False, True,
                     id="unknown-verdict"),
    ],
)
def test_the_checks_catch_a_wrong_payload(
        go_binary: Path, payloads: list[tuple[str, dict[str, Any]]],
        where: tuple[str, ...], value: Any, go: bool, powertools: bool) -> None:
    require_powertools()
    body = copy.deepcopy(dict(payloads)["plain/scanned/lambda-event"])
    target = body["Records"][0]["ses"]
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    [result] = go_check(go_binary, [body])
    assert (unexplained_powertools(body) != []) is powertools
    assert (result["error"] != "") is go


def test_an_unknown_field_is_caught(
        go_binary: Path, payloads: list[tuple[str, dict[str, Any]]]) -> None:
    body = copy.deepcopy(dict(payloads)["plain/scanned/s3"])
    body["mail"]["commonHeaders"]["From"] = ["a@x.example"]  # wrong case: Go would take it
    [result] = go_check(go_binary, [body])
    assert unexplained_go(result)["unknown"] == ["mail.commonHeaders.From"]
