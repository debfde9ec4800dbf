"""Issue acceptance for actions: real Postfix + milter + `mxrules worker` + moto server.

Messages go in through SMTP, the milter spools them, the worker runs the
matched rules' actions against moto in server mode; the tests read back what
landed in S3, SNS (through an SQS subscription) and Lambda (moto's recorded
invocations), and what the spool says.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness.moto import MotoServer
from harness.mxrules_proc import MilterProcess, WorkerProcess
from harness.ports import free_port
from harness.postfix import Postfix
from harness.sink import SmtpSink
from harness.smtp import Client, Result, send
from harness.stack import message, write_config
from harness.waiting import wait_until
from mxrules.spool import STATES, Spool

pytestmark = pytest.mark.postfix

GOLDEN = Path(__file__).resolve().parent.parent / "unit" / "golden"


@dataclass
class Loop:
    dir: Path
    moto: MotoServer
    milter: MilterProcess
    worker: WorkerProcess
    postfix: Postfix
    sink: SmtpSink
    spool: Spool
    bucket: str
    kms: str
    topic: str
    queue: str
    function: str

    def send(self, rcpts: list[str], msg: bytes | None = None, sender: str = "a@sender.test"
             ) -> Result:
        r = send("127.0.0.1", self.postfix.smtp_port, sender, rcpts,
                 msg or message(sender, rcpts))
        assert r.data is not None and r.data[0] == 250, r
        return r

    def counts(self) -> dict[str, int]:
        return {s: len(self.spool.ids(s)) for s in STATES}

    def wait_idle(self, timeout: float = 30) -> dict[str, int]:
        """Wait until no job is incoming, active or deferred (done or dead-lettered)."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if counts["incoming"] == counts["active"] == counts["deferred"] == 0:
                return counts
            if time.monotonic() > deadline:
                raise TimeoutError(f"spool not idle: {counts}\n{self.worker.log()[-3000:]}")
            time.sleep(0.05)


def rules_for(loop: dict[str, str], **over: Any) -> list[dict[str, Any]]:
    return [
        {"name": "everything", "enabled": True, "recipients": ["user@example.com"],
         "actions": [
             {"add_header": {"header_name": "X-Mx-Test", "header_value": "added"}},
             {"s3": {"bucket_name": loop["bucket"], "object_key_prefix": "mail/",
                     "kms_key_arn": loop["kms"]}},
             {"sns": {"topic_arn": loop["topic"], "encoding": "Base64"}},
             {"lambda": {"function_arn": loop["function"], "invocation_type": "Event"}},
         ]},
    ]


@pytest.fixture
def make_loop(moto_server: MotoServer, postfix_factory: Any, smtp_sink: SmtpSink,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    procs: list[Any] = []

    def make(rules: Any = rules_for, start_worker: bool = True, **config: Any) -> Loop:
        directory = tmp_path_factory.mktemp("loop")
        res = {"bucket": moto_server.make_bucket("mail-bucket"),
               "kms": moto_server.make_kms_key()}
        res["topic"], res["queue"] = moto_server.make_topic_with_queue("mail-topic")
        res["function"] = moto_server.make_function("mail-fn")
        milter_port, worker_port = free_port(), free_port()
        config.setdefault("worker", {})
        config["spool"] = {"directory": str(directory / "spool"), **config.get("spool", {})}
        config["worker"] = {"threads": 2, "scan_interval": 0.05, "retry_initial_delay": 0.05,
                            "retry_max_delay": 0.5, "drain_timeout": 10, **config["worker"]}
        path = write_config(
            directory, port=milter_port,
            rules=rules(res) if callable(rules) else rules,
            metrics={"milter_listen": "", "worker_listen": f"127.0.0.1:{worker_port}"},
            aws={"region": "us-east-1", "endpoint_url": moto_server.endpoint_url,
                 "connect_timeout": 1, "read_timeout": 5},
            bounce={"smtp_relay": f"127.0.0.1:{smtp_sink.port}", "timeout": 5,
                    **config.pop("bounce", {})},
            **config)
        milter = MilterProcess(path, milter_port, directory / "milter.log")
        worker = WorkerProcess(path, worker_port, directory / "worker.log",
                               env=moto_server.aws_env())
        procs.extend([milter, worker])  # before start(): stopped at teardown whatever happens
        milter.start()
        if start_worker:
            worker.start()
        postfix = postfix_factory(milter=milter.postfix_spec, relay_port=smtp_sink.port)
        return Loop(directory, moto_server, milter, worker, postfix, smtp_sink,
                    Spool(str(directory / "spool")), **res)

    yield make
    for p in procs:
        p.stop()


def shape(value: Any) -> Any:
    """The JSON type skeleton of a value: same keys, same types, list elements' shape."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def test_add_header_s3_kms_sns_base64_lambda_event(make_loop: Any) -> None:
    loop: Loop = make_loop()
    loop.send(["user@example.com"], message("a@sender.test", ["user@example.com"],
                                            subject="full loop"))
    assert loop.wait_idle() == {"incoming": 0, "active": 0, "deferred": 0, "failed": 0,
                                "corrupt": 0}
    [key] = loop.moto.s3_keys(loop.bucket, "mail/")
    message_id = key.removeprefix("mail/")
    body, meta = loop.moto.s3_object(loop.bucket, key)
    assert meta["ServerSideEncryption"] == "aws:kms"
    assert meta["SSEKMSKeyId"] == loop.kms
    assert b"\r\nX-Mx-Test: added\r\n" in body
    assert body.startswith(b"Return-Path: <a@sender.test>\r\nReceived: from client.test")
    assert f"id {message_id}".encode() in body
    assert body.endswith(b"Hello.\r\n")

    [envelope] = loop.moto.sns_messages(loop.queue, 1)
    assert envelope["Subject"] == "Amazon SES Email Receipt Notification"
    note = json.loads(envelope["Message"])
    assert base64.b64decode(note["content"]) == body
    assert note["mail"]["messageId"] == message_id
    assert note["receipt"]["recipients"] == ["user@example.com"]
    assert note["receipt"]["action"] == {"type": "SNS", "topicArn": loop.topic,
                                         "encoding": "BASE64"}
    golden = json.loads((GOLDEN / "notification_sns_base64.json").read_text())
    assert shape(note) == shape(golden)

    [call] = loop.moto.lambda_invocations("mail-fn")
    assert call.invocation_type == "Event"
    event = call.json()
    golden_event = json.loads((GOLDEN / "lambda_event_lambda_action.json").read_text())
    assert shape(event) == shape(golden_event)
    assert event["Records"][0]["ses"]["mail"]["messageId"] == message_id
    assert event["Records"][0]["ses"]["receipt"]["action"]["invocationType"] == "Event"
    assert loop.worker.problems() == []
    assert loop.milter.problems() == []


def test_two_rules_run_in_order_each_with_its_own_recipients(make_loop: Any) -> None:
    def rules(res: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {"name": "first", "enabled": True, "recipients": ["user@example.com"],
             "actions": [{"lambda": {"function_arn": res["function"],
                                     "invocation_type": "Event"}}]},
            {"name": "second", "enabled": True,
             "recipients": ["user@example.com", "other@example.com"],
             "actions": [{"lambda": {"function_arn": res["function"],
                                     "invocation_type": "Event"}}]},
        ]
    loop: Loop = make_loop(rules, worker={"threads": 1})
    loop.send(["other@example.com", "user@example.com"])
    loop.wait_idle()
    calls = loop.moto.lambda_invocations("mail-fn")
    recipients = [c.json()["Records"][0]["ses"]["receipt"]["recipients"] for c in calls]
    assert recipients == [["user@example.com"], ["other@example.com", "user@example.com"]]


@pytest.mark.parametrize("answer, first, second", [
    pytest.param('{"disposition": "STOP_RULE_SET"}', False, False, id="stop-rule-set"),
    pytest.param('{"disposition": "stop_rule"}', False, True, id="stop-rule-any-case"),
    pytest.param('{"disposition": "CONTINUE"}', True, True, id="continue"),
    pytest.param('{"disposition": "SOMETHING_ELSE"}', True, True, id="unknown-continues"),
    pytest.param("not json", True, True, id="garbage-continues"),
    # Past the JSON parser's recursion limit: read as CONTINUE, the function invoked once.
    pytest.param("[" * 100_000 + "]" * 100_000, True, True, id="deeply-nested-continues"),
])
def test_request_response_lambda_disposition(make_loop: Any, answer: str, first: bool,
                                             second: bool) -> None:
    def rules(res: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {"name": "asks", "enabled": True, "recipients": ["user@example.com"],
             "actions": [{"lambda": {"function_arn": res["function"],
                                     "invocation_type": "RequestResponse"}},
                         {"s3": {"bucket_name": res["bucket"], "object_key_prefix": "first/"}}]},
            {"name": "later", "enabled": True, "recipients": ["user@example.com"],
             "actions": [{"s3": {"bucket_name": res["bucket"],
                                 "object_key_prefix": "second/"}}]},
        ]
    loop: Loop = make_loop(rules)
    loop.moto.queue_lambda_results([answer])
    loop.send(["user@example.com"])
    loop.wait_idle()
    assert bool(loop.moto.s3_keys(loop.bucket, "first/")) is first
    assert bool(loop.moto.s3_keys(loop.bucket, "second/")) is second
    [call] = loop.moto.lambda_invocations("mail-fn")
    assert call.invocation_type == "RequestResponse"


def test_s3_prefix_is_a_folder_as_handlers_rebuild_it(make_loop: Any) -> None:
    """A handler that reads `objectKeyPrefix` and the messageId finds the object at
    `prefix + "/" + messageId`; with no prefix the key is the messageId alone."""
    def rules(res: dict[str, str]) -> list[dict[str, Any]]:
        return [{"name": "store", "enabled": True, "recipients": ["user@example.com"],
                 "actions": [{"s3": {"bucket_name": res["bucket"], "topic_arn": res["topic"],
                                     "object_key_prefix": "email/produccion/inbox"}},
                             {"s3": {"bucket_name": res["bucket"], "topic_arn": res["topic"]}}]}]
    loop: Loop = make_loop(rules)
    loop.send(["user@example.com"])
    loop.wait_idle()
    notes = [json.loads(e["Message"]) for e in loop.moto.sns_messages(loop.queue, 2)]
    [message_id] = {n["mail"]["messageId"] for n in notes}
    actions = sorted((n["receipt"]["action"] for n in notes), key=lambda a: a["objectKeyPrefix"])
    assert actions == [
        {"type": "S3", "topicArn": loop.topic, "bucketName": loop.bucket,
         "objectKeyPrefix": "", "objectKey": message_id},
        {"type": "S3", "topicArn": loop.topic, "bucketName": loop.bucket,
         "objectKeyPrefix": "email/produccion/inbox",
         "objectKey": f"email/produccion/inbox/{message_id}"},
    ]
    for action in actions:
        prefix = action["objectKeyPrefix"]
        rebuilt = f"{prefix}/{message_id}" if prefix else message_id
        body, _ = loop.moto.s3_object(loop.bucket, rebuilt)
        assert body.endswith(b"Hello.\r\n")
    assert sorted(loop.moto.s3_keys(loop.bucket, "")) == sorted(
        [message_id, f"email/produccion/inbox/{message_id}"])


def test_stop_action_ends_the_rule_set(make_loop: Any) -> None:
    def rules(res: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {"name": "stops", "enabled": True, "recipients": ["user@example.com"],
             "actions": [{"s3": {"bucket_name": res["bucket"], "object_key_prefix": "first/"}},
                         {"stop": {"scope": "RuleSet", "topic_arn": res["topic"]}},
                         {"s3": {"bucket_name": res["bucket"], "object_key_prefix": "never/"}}]},
            {"name": "later", "enabled": True, "recipients": ["user@example.com"],
             "actions": [{"s3": {"bucket_name": res["bucket"],
                                 "object_key_prefix": "second/"}}]},
        ]
    loop: Loop = make_loop(rules)
    loop.send(["user@example.com"])
    loop.wait_idle()
    assert len(loop.moto.s3_keys(loop.bucket, "first/")) == 1
    assert loop.moto.s3_keys(loop.bucket, "never/") == []
    assert loop.moto.s3_keys(loop.bucket, "second/") == []
    # The Stop action's topic_arn: a notification for that action, without content.
    [envelope] = loop.moto.sns_messages(loop.queue, 1)
    note = json.loads(envelope["Message"])
    assert note["receipt"]["action"] == {"type": "Stop", "topicArn": loop.topic}
    assert "content" not in note


def test_bounce_sends_one_dsn_and_never_to_the_null_sender(make_loop: Any) -> None:
    rules = [{"name": "gone", "enabled": True, "recipients": ["user@example.com"],
              "actions": [{"bounce": {"smtp_reply_code": "550", "status_code": "5.1.1",
                                      "message": "Mailbox does not exist",
                                      "sender": "mailer-daemon@example.com"}}]}]
    # SES's own behaviour, which an operator can choose: accept, then always bounce
    # (by default this recipient is refused at RCPT and an unauthenticated sender
    # gets no DSN: tests/integration/test_bounce_backscatter.py).
    loop: Loop = make_loop(rules, bounce={"reject_at_rcpt": False,
                                          "require_authenticated_sender": False})
    loop.send(["user@example.com"], sender="")  # the null sender: no DSN
    loop.send(["user@example.com"], sender="alice@sender.test")
    loop.wait_idle()
    [dsn] = loop.sink.wait_for(1)
    assert dsn.mail_from in ("", "<>")
    assert dsn.rcpt_tos == ("alice@sender.test",)
    import email
    parsed = email.message_from_bytes(dsn.data)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    report = dsn.data.decode(errors="replace")
    assert "Final-Recipient: rfc822; user@example.com" in report
    assert "Status: 5.1.1" in report
    assert "Diagnostic-Code: smtp; 550 5.1.1 Mailbox does not exist" in report
    time.sleep(0.3)  # the null-sender job finished before; nothing more may arrive
    assert len(loop.sink.messages) == 1


def _spool_cli(loop: Loop, *args: str) -> Any:
    import subprocess

    from harness.mxrules_proc import MXRULES
    proc = subprocess.run([MXRULES, "spool", *args, "--config", str(loop.worker.config_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if "--json" in args else proc.stdout


def test_outage_keeps_jobs_queued_then_completes(make_loop: Any) -> None:
    loop: Loop = make_loop(lambda res: [{"name": "store", "enabled": True,
                                         "recipients": ["user@example.com"],
                                         "actions": [{"s3": {"bucket_name": res["bucket"]}}]}])
    loop.moto.stop()
    for _ in range(3):
        loop.send(["user@example.com"])

    def retried() -> Any:
        rows = _spool_cli(loop, "list", "--json")
        return rows if len(rows) == 3 and all(r["attempts"] >= 2 for r in rows) else None
    rows = wait_until(retried, "jobs retrying")
    assert all(r["state"] in ("deferred", "active") for r in rows)
    assert all("S3 action: connection" in r["last_error"] for r in rows), rows
    table = _spool_cli(loop, "list")
    assert "3 job(s)" in table and "store #1 S3" in table

    loop.moto.start()
    loop.moto.make_bucket("mail-bucket")
    loop.wait_idle()
    assert len(loop.moto.s3_keys(loop.bucket)) == 3


def test_retry_window_dead_letters_and_requeue_brings_back(make_loop: Any) -> None:
    loop: Loop = make_loop(lambda res: [{"name": "store", "enabled": True,
                                         "recipients": ["user@example.com"],
                                         "actions": [{"s3": {"bucket_name": res["bucket"]}}]}],
                           worker={"retry_window": 1})
    loop.moto.stop()
    loop.send(["user@example.com"])
    wait_until(lambda: loop.counts()["failed"] == 1, "dead letter")
    [row] = _spool_cli(loop, "list", "--state", "failed", "--json")
    assert row["failed"] == ["store #1 S3"] and "connection" in row["last_error"]
    shown = _spool_cli(loop, "show", row["id"])
    assert "last error" in shown and "failed     store #1 S3" in shown
    assert re.search(r"store action 1 S3: FAILED after ([2-9]|\d\d+) attempts", shown), shown
    assert "dead-lettered" in loop.worker.log()

    loop.moto.start()
    loop.moto.make_bucket("mail-bucket")
    out = _spool_cli(loop, "requeue", "--all-failed")
    assert "requeued 1 job(s)" in out
    loop.wait_idle()
    assert loop.counts()["failed"] == 0
    assert loop.moto.s3_keys(loop.bucket) == [row["id"]]


def test_kill_9_worker_during_200_messages_loses_nothing(make_loop: Any) -> None:
    loop: Loop = make_loop(lambda res: [{"name": "store", "enabled": True,
                                         "recipients": ["user@example.com"],
                                         "actions": [{"s3": {"bucket_name": res["bucket"]}}]}])
    kills = 0
    for i in range(200):
        loop.send(["user@example.com"], message("a@sender.test", ["user@example.com"],
                                                subject=f"n{i}"))
        if i in (60, 140):
            loop.worker.kill()
            kills += 1
            loop.worker.start()
    loop.wait_idle(timeout=120)
    assert loop.spool.ids("corrupt") == []
    keys = loop.moto.s3_keys(loop.bucket)
    assert len(keys) == 200
    puts = [k for k in _recorded_puts(loop)]
    duplicates = len(puts) - len(set(puts))
    assert set(puts) == set(keys)
    assert duplicates <= kills, duplicates


def _recorded_puts(loop: Loop) -> list[str]:
    """Object keys of every PutObject moto received (its request recording)."""
    keys = []
    for line in loop.moto.recording_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("method") == "PUT" and "/mail-bucket/" in rec.get("url", ""):
            keys.append(rec["url"].split("/mail-bucket/", 1)[1].split("?", 1)[0])
    return keys


def test_two_workers_never_run_the_same_job(make_loop: Any) -> None:
    loop: Loop = make_loop(lambda res: [{"name": "store", "enabled": True,
                                         "recipients": ["user@example.com"],
                                         "actions": [{"s3": {"bucket_name": res["bucket"]}}]}],
                           start_worker=False, worker={"threads": 3})
    for i in range(60):
        loop.send(["user@example.com"], message("a@sender.test", ["user@example.com"],
                                                subject=f"m{i}"))
    # The second process reads the same rules and spool, with its own metrics port.
    import yaml
    doc = yaml.safe_load(loop.worker.config_path.read_text())
    port = free_port()
    doc["metrics"]["worker_listen"] = f"127.0.0.1:{port}"
    other = loop.dir / "worker2.yaml"
    other.write_text(yaml.safe_dump(doc))
    second = WorkerProcess(other, port, loop.dir / "worker2.log", env=loop.moto.aws_env())
    try:
        loop.worker.start()
        second.start()
        loop.wait_idle(timeout=60)
    finally:
        second.stop()
    puts = _recorded_puts(loop)
    assert len(puts) == 60 and len(set(puts)) == 60  # every job claimed exactly once
    done = [line for log in (loop.worker.log(), second.log())
            for line in log.splitlines() if "job done" in line]
    assert len(done) == 60


def test_corrupt_job_is_moved_aside_and_the_worker_goes_on(make_loop: Any) -> None:
    import urllib.request
    loop: Loop = make_loop(lambda res: [{"name": "store", "enabled": True,
                                         "recipients": ["user@example.com"],
                                         "actions": [{"s3": {"bucket_name": res["bucket"]}}]}],
                           start_worker=False)
    loop.send(["user@example.com"])
    loop.send(["user@example.com"])
    first, second = loop.spool.ids("incoming")
    meta = Path(loop.spool.path("incoming", first)) / "job.json"
    meta.write_bytes(meta.read_bytes()[:40])  # truncated on disk
    loop.worker.start()
    loop.wait_idle()
    assert loop.spool.ids("corrupt") == [first]
    assert loop.moto.s3_keys(loop.bucket) == [second]
    assert f"job {first}" in loop.worker.log()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{loop.worker.port}/metrics",
                                     timeout=5).read().decode()
    assert 'mxrules_jobs_total{result="corrupt"} 1.0' in metrics
    assert 'mxrules_spool_jobs{state="corrupt"} 1.0' in metrics


def test_sigterm_drains_the_worker(make_loop: Any) -> None:
    loop: Loop = make_loop(lambda res: [{"name": "store", "enabled": True,
                                         "recipients": ["user@example.com"],
                                         "actions": [{"s3": {"bucket_name": res["bucket"]}}]}])
    loop.send(["user@example.com"])
    loop.wait_idle()
    assert loop.worker.proc is not None
    loop.worker.signal(signal.SIGTERM)
    assert loop.worker.proc.wait(15) == 0
    assert "draining" in loop.worker.log() and "worker stopped" in loop.worker.log()


# -- SES's size limits, and what happens when an action cannot be done ----------------

NEAR_S3_LIMIT = 41_942_940  # 100 bytes under 40 MiB: SES's own headers push it over


def sized(head: bytes, size: int, unit: str = "x") -> bytes:
    """`head` (headers and the empty line) and a body of `unit` lines: `size` bytes in all."""
    line = (unit * (76 // len(unit.encode()))).encode() + b"\r\n"
    need = size - len(head)
    body = line * max(0, need // len(line) - 1)
    rest = need - len(body)  # one last line of ASCII, CRLF ended
    assert rest >= 2
    message = head + body + b"z" * (rest - 2) + b"\r\n"
    assert len(message) == size
    return message


def _dsns(loop: Loop, count: int) -> list[str]:
    return [m.data.decode(errors="replace") for m in loop.sink.wait_for(count)]


def test_near_40_mb_message_is_refused_during_smtp_or_bounced_never_dead_lettered(
        make_loop: Any) -> None:
    def rules(res: dict[str, str]) -> list[dict[str, Any]]:
        return [{"name": "store", "enabled": True, "recipients": ["user@example.com"],
                 "actions": [{"s3": {"bucket_name": res["bucket"]}}]},
                {"name": "call", "enabled": True, "recipients": ["other@example.com"],
                 "actions": [{"lambda": {"function_arn": res["function"]}}]}]
    # The sender is not authenticated (no SPF here): SES bounces to it all the same,
    # which is the Bounce machinery's choice to make (README, Bounce).
    loop: Loop = make_loop(rules, bounce={"require_authenticated_sender": False})
    msg = sized(message("a@sender.test", ["user@example.com"], body=""), NEAR_S3_LIMIT)
    # Declared with SIZE=: the recipient is refused at RCPT, the 40 MB is never sent.
    with Client("127.0.0.1", loop.postfix.smtp_port) as client:
        client.ehlo()
        assert client.mail("a@sender.test", size=len(msg))[0] == 250
        code, text = client.rcpt("user@example.com")
        assert code == 550 and text.startswith("5.3.4"), (code, text)
        assert client.rcpt("other@example.com")[0] == 250  # its rule has no size limit
    # Not declared: refused at end of data, nothing stored.
    r = send("127.0.0.1", loop.postfix.smtp_port, "a@sender.test", ["user@example.com"], msg)
    assert r.data is not None and r.data[0] == 552 and r.data[1].startswith("5.3.4"), r
    assert loop.counts() == dict.fromkeys(STATES, 0)
    # With a recipient whose rule takes it, the message is accepted; the S3 action then
    # bounces it as SES does (a DSN), and the other rule's Lambda runs.
    r = send("127.0.0.1", loop.postfix.smtp_port, "a@sender.test",
             ["user@example.com", "other@example.com"], msg)
    assert r.data is not None and r.data[0] == 250, r
    assert loop.wait_idle(timeout=60) == dict.fromkeys(STATES, 0)
    assert loop.moto.s3_keys(loop.bucket) == []
    [dsn] = _dsns(loop, 1)
    assert "Final-Recipient: rfc822; user@example.com" in dsn and "Status: 5.3.4" in dsn
    assert "other@example.com" not in dsn.split("Content-Type: text/rfc822-headers")[0]
    assert len(loop.moto.lambda_invocations("mail-fn")) == 1
    assert "dead-lettered" not in loop.worker.log()


def test_sns_publishes_emails_up_to_150_kb_whatever_the_encoding(make_loop: Any) -> None:
    def rules(res: dict[str, str]) -> list[dict[str, Any]]:
        return [{"name": "b64", "enabled": True, "recipients": ["b64@example.com"],
                 "actions": [{"sns": {"topic_arn": res["topic"], "encoding": "Base64"}}]},
                {"name": "utf8", "enabled": True, "recipients": ["utf8@example.com"],
                 "actions": [{"sns": {"topic_arn": res["topic"], "encoding": "UTF-8"}}]}]
    loop: Loop = make_loop(rules)
    b64 = sized(message("a@sender.test", ["b64@example.com"], body=""), 112 * 1024)
    utf8 = sized(message("a@sender.test", ["utf8@example.com"], body=""), 149 * 1024, "é")
    loop.send(["b64@example.com"], b64)
    loop.send(["utf8@example.com"], utf8)
    assert loop.wait_idle()["failed"] == 0
    published = {}
    for envelope in loop.moto.sns_messages(loop.queue, 2):
        note = json.loads(envelope["Message"])
        published[note["receipt"]["recipients"][0]] = (note, len(envelope["Message"].encode()))
    note, size = published["b64@example.com"]
    stored = base64.b64decode(note["content"])
    assert stored.startswith(b"Return-Path: <a@sender.test>\r\n") and stored.endswith(b64)
    # The notification is over 150 KB: that limit is the email's, SNS takes 256 KB.
    assert 150 * 1024 < size <= 256 * 1024, size
    note, size = published["utf8@example.com"]
    assert note["content"].encode().endswith(utf8)
    assert 150 * 1024 < size <= 256 * 1024, size


def test_email_over_150_kb_for_sns_is_refused_in_session_or_bounced(make_loop: Any) -> None:
    def rules(res: dict[str, str]) -> list[dict[str, Any]]:
        return [{"name": "publish", "enabled": True, "recipients": ["sns@example.com"],
                 "actions": [{"sns": {"topic_arn": res["topic"], "encoding": "UTF-8"}}]},
                {"name": "store", "enabled": True, "recipients": ["store@example.com"],
                 "actions": [{"s3": {"bucket_name": res["bucket"]}}]}]
    # The sender is not authenticated (no SPF here): SES bounces to it all the same,
    # which is the Bounce machinery's choice to make (README, Bounce).
    loop: Loop = make_loop(rules, bounce={"require_authenticated_sender": False})
    big = sized(message("a@sender.test", ["sns@example.com"], body=""), 151 * 1024)
    with Client("127.0.0.1", loop.postfix.smtp_port) as client:  # SIZE= declared
        client.ehlo()
        assert client.mail("a@sender.test", size=len(big))[0] == 250
        code, text = client.rcpt("sns@example.com")
        assert code == 550 and text.startswith("5.3.4"), (code, text)
        assert client.rcpt("store@example.com")[0] == 250
    r = send("127.0.0.1", loop.postfix.smtp_port, "a@sender.test", ["sns@example.com"], big)
    assert r.data is not None and r.data[0] == 552 and r.data[1].startswith("5.3.4"), r
    assert loop.counts() == dict.fromkeys(STATES, 0)
    # Another recipient's rule takes it: accepted, stored in S3, and the SNS rule's
    # recipient bounced with a DSN -- not a dead letter.
    loop.send(["sns@example.com", "store@example.com"], big)
    assert loop.wait_idle() == dict.fromkeys(STATES, 0)
    assert len(loop.moto.s3_keys(loop.bucket)) == 1
    [dsn] = _dsns(loop, 1)
    assert loop.sink.messages[0].rcpt_tos == ("a@sender.test",)
    report = dsn.split("Content-Type: text/rfc822-headers")[0]
    assert "Final-Recipient: rfc822; sns@example.com" in report and "Status: 5.3.4" in report
    assert "store@example.com" not in report
    assert loop.moto.sns_messages(loop.queue, 0, timeout=1) == []


def test_10000_cc_notification_and_lambda_event_fit_and_are_delivered(make_loop: Any) -> None:
    def rules(res: dict[str, str]) -> list[dict[str, Any]]:
        return [{"name": "list", "enabled": True, "recipients": ["user@example.com"],
                 "actions": [{"sns": {"topic_arn": res["topic"], "encoding": "Base64"}},
                             {"lambda": {"function_arn": res["function"]}}]}]
    loop: Loop = make_loop(rules)
    # Ten Cc headers of 1,000 addresses: each within Postfix's header_size_limit and
    # header_address_token_limit, so Postfix passes all 10,000 on.
    cc = "".join("Cc: " + ",\r\n ".join(",".join(f"{n}@c.test" for n in range(j, j + 5))
                                         for j in range(i, i + 1000, 5)) + "\r\n"
                 for i in range(0, 10000, 1000))
    head = message("a@sender.test", ["user@example.com"], body="")
    head = head.replace(b"\r\n\r\n", b"\r\n" + cc.encode() + b"\r\n", 1)
    msg = sized(head, 149 * 1024)
    loop.send(["user@example.com"], msg)
    assert loop.wait_idle() == dict.fromkeys(STATES, 0)
    [envelope] = loop.moto.sns_messages(loop.queue, 1)
    assert len(envelope["Message"].encode()) <= 256 * 1024
    note = json.loads(envelope["Message"])
    assert base64.b64decode(note["content"]).endswith(msg)  # the whole message is there
    [call] = loop.moto.lambda_invocations("mail-fn")
    assert len(call.payload) <= 256 * 1024
    event_mail = call.json()["Records"][0]["ses"]["mail"]
    for mail in (note["mail"], event_mail):
        destination = mail["destination"]
        assert destination[:3] == ["user@example.com", "0@c.test", "1@c.test"]
        assert 100 < len(destination) < 10001
        assert len(json.dumps(destination, separators=(",", ":")).encode()) <= 10 * 1024
        cc_list = mail["commonHeaders"]["cc"]
        assert cc_list[:2] == ["0@c.test", "1@c.test"]
        assert len(json.dumps(cc_list, separators=(",", ":")).encode()) <= 2 * 1024
        assert mail["headersTruncated"] is True


def test_an_action_failing_for_good_does_not_stop_the_next_and_requeue_runs_only_it(
        make_loop: Any) -> None:
    def rules(res: dict[str, str]) -> list[dict[str, Any]]:
        return [{"name": "chain", "enabled": True, "recipients": ["user@example.com"],
                 "actions": [{"s3": {"bucket_name": "late-bucket", "object_key_prefix": "a/"}},
                             {"lambda": {"function_arn": res["function"]}},
                             {"s3": {"bucket_name": res["bucket"], "object_key_prefix": "b/"}}]}]
    loop: Loop = make_loop(rules, worker={"retry_window": 1})
    loop.send(["user@example.com"])
    [job_id] = wait_until(lambda: loop.spool.ids("failed"), "a dead letter")
    # The S3 action that cannot be done was given up on; the two after it ran.
    assert len(loop.moto.lambda_invocations("mail-fn")) == 1
    assert loop.moto.s3_keys(loop.bucket) == [f"b/{job_id}"]
    job = loop.spool.load("failed", job_id)
    assert job.progress.failed == ((0, 0, "action"),)
    assert "action failed for good" in loop.worker.log()
    # Requeued once the bucket exists: only the failed action runs again.
    loop.moto.make_bucket("late-bucket")
    assert "requeued 1 job(s)" in _spool_cli(loop, "requeue", "--all-failed")
    assert loop.wait_idle() == dict.fromkeys(STATES, 0)
    assert loop.moto.s3_keys("late-bucket") == [f"a/{job_id}"]
    assert len(loop.moto.lambda_invocations("mail-fn")) == 1
    assert _recorded_puts(loop) == [f"b/{job_id}"]


def _metric(loop: Loop, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{loop.worker.port}/metrics",
                                  timeout=5).read().decode()
    return {",".join(s.labels.values()): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def _bytes_in(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def test_dead_letters_retention_removes_the_oldest_by_size_then_by_age(make_loop: Any) -> None:
    rules = [{"name": "broken", "enabled": True, "recipients": ["user@example.com"],
              "actions": [{"s3": {"bucket_name": "no-such-bucket"}}]}]
    # Each dead letter takes about 23 KB (a 20 KB message and its job.json): two fit.
    loop: Loop = make_loop(rules, worker={"retry_window": 0.3},
                           spool={"failed_max_size": 56_000, "failed_max_age": 0})
    ids = []
    for i in range(3):
        loop.send(["user@example.com"], message("a@sender.test", ["user@example.com"],
                                                subject=f"n{i}", body=("x" * 78 + "\r\n") * 250))
        new = wait_until(lambda: set(loop.spool.ids("failed")) - set(ids), "a dead letter")
        ids.extend(new)
    first, second, third = ids
    wait_until(lambda: loop.spool.ids("failed") == sorted([second, third]), "size retention")
    assert loop.spool.find(first) is None  # removed for good, not moved anywhere
    removed = wait_until(lambda: lines_with(loop.worker.log(), "removed by retention"), "log")
    assert len(removed) == 1 and f"message_id={first}" in removed[0] and "reason=size" in removed[0]
    kept = sum(_bytes_in(loop.spool.path("failed", i)) for i in (second, third))
    wait_until(lambda: _metric(loop, "mxrules_dead_letter_bytes") == {"": kept}, "gauge")
    assert _metric(loop, "mxrules_dead_letter_retention_bytes") == {"": 56_000}
    assert _metric(loop, "mxrules_dead_letters_removed_total") == {"age": 0, "size": 1}
    # An age limit, on reload: the two left are older than a second.
    path = loop.worker.config_path
    doc = yaml.safe_load(path.read_text())
    doc["spool"]["failed_max_age"] = 1
    path.write_text(yaml.safe_dump(doc))
    loop.worker.signal(signal.SIGUSR1)
    wait_until(lambda: loop.spool.ids("failed") == [], "age retention")
    wait_until(lambda: _metric(loop, "mxrules_dead_letter_bytes") == {"": 0}, "gauge")
    assert _metric(loop, "mxrules_dead_letters_removed_total") == {"age": 2, "size": 1}
    assert len(lines_with(loop.worker.log(), "reason=age")) == 2


def lines_with(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]
