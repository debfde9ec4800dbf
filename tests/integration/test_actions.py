"""Issue acceptance for actions: real Postfix + milter + `mxrules worker` + moto server.

Messages go in through SMTP, the milter spools them, the worker runs the
matched rules' actions against moto in server mode; the tests read back what
landed in S3, SNS (through an SQS subscription) and Lambda (moto's recorded
invocations), and what the spool says.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.moto import MotoServer
from harness.mxrules_proc import MilterProcess, WorkerProcess
from harness.ports import free_port
from harness.postfix import Postfix
from harness.sink import SmtpSink
from harness.smtp import Result, send
from harness.stack import message, write_config
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
        config["worker"] = {"threads": 2, "scan_interval": 0.05, "retry_initial_delay": 0.05,
                            "retry_max_delay": 0.5, "drain_timeout": 10, **config["worker"]}
        path = write_config(
            directory, port=milter_port,
            rules=rules(res) if callable(rules) else rules,
            metrics={"milter_listen": "", "worker_listen": f"127.0.0.1:{worker_port}"},
            aws={"region": "us-east-1", "endpoint_url": moto_server.endpoint_url,
                 "connect_timeout": 1, "read_timeout": 5},
            bounce={"smtp_relay": f"127.0.0.1:{smtp_sink.port}", "timeout": 5},
            **config)
        milter = MilterProcess(path, milter_port, directory / "milter.log")
        milter.start()
        worker = WorkerProcess(path, worker_port, directory / "worker.log",
                               env=moto_server.aws_env())
        procs.extend([milter, worker])
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
