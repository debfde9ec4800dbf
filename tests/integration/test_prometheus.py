"""Issue acceptance for observability: a real Prometheus scrapes both programs end to end.

Real Postfix + `mxrules milter` + `mxrules worker` + moto, and Debian's
Prometheus on loopback scraping both metrics endpoints every second with the
shipped alert rules loaded.  Mail goes in (accepted, a recipient refused 550, a
client refused by an IP filter, recipients of another domain), the worker
stores the accepted messages in S3; then Prometheus's HTTP API must show those
events, the shipped alerts must evaluate cleanly and stay quiet, every dashboard
query must run, and the logs must hold one key=value line per decision with the
message id and Postfix queue id -- and no message content.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pytest

from harness.moto import MotoServer
from harness.mxrules_proc import MilterProcess, WorkerProcess
from harness.ports import free_port
from harness.prometheus import (
    ALERTS,
    PrometheusFactory,
    PrometheusServer,
    concrete,
    dashboard_expressions,
)
from harness.sink import SmtpSink
from harness.smtp import send
from harness.stack import message, write_config
from mxrules.spool import Spool

pytestmark = pytest.mark.postfix

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def fields(line: str) -> dict[str, str]:
    """The key=value fields of a log line (JSON-quoted values unquoted)."""
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(line)}


def lines(log: str, event: str) -> list[dict[str, str]]:
    """The fields of each INFO+ line whose message starts with `event`."""
    rx = re.compile(r"^[A-Z]+ mxrules\.\w+: " + re.escape(event) + r" (.*)$", re.M)
    return [fields(m.group(1)) for m in rx.finditer(log)]


def wait_idle(spool: Spool, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(spool.ids(s) for s in ("incoming", "active", "deferred")):
        assert time.monotonic() < deadline, {s: spool.ids(s) for s in ("incoming", "deferred")}
        time.sleep(0.05)


def equals(expected: dict[str, float], by: str) -> Any:
    def ok(result: list[dict[str, Any]]) -> bool:
        got = {r["metric"].get(by, ""): float(r["value"][1]) for r in result}
        return got == expected
    return ok


def test_prometheus_sees_mail_flow_rejections_actions_and_a_dead_letter(
        moto_server: MotoServer, postfix_factory: Any, smtp_sink: SmtpSink,
        prometheus_factory: PrometheusFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("observe")
    bucket = moto_server.make_bucket("mail-bucket")
    milter_port, milter_metrics, worker_metrics = free_port(), free_port(), free_port()
    rules = [{"name": "store", "enabled": True, "recipients": ["user@example.com"],
              "actions": [{"s3": {"bucket_name": bucket, "object_key_prefix": "mail/"}}]},
             # No such bucket: retried (not-found) until the short retry window ends.
             {"name": "broken", "enabled": True, "recipients": ["broken@example.com"],
              "actions": [{"s3": {"bucket_name": "no-such-bucket"}}]}]
    path = write_config(
        directory, port=milter_port, rules=rules,
        metrics={"milter_listen": f"127.0.0.1:{milter_metrics}",
                 "worker_listen": f"127.0.0.1:{worker_metrics}"},
        worker={"threads": 2, "scan_interval": 0.05, "retry_window": 1.5,
                "retry_initial_delay": 0.1, "retry_max_delay": 0.4},
        aws={"region": "us-east-1", "endpoint_url": moto_server.endpoint_url,
             "connect_timeout": 1, "read_timeout": 5},
        delivery="deliver")
    milter = MilterProcess(path, milter_port, directory / "milter.log")
    worker = WorkerProcess(path, worker_metrics, directory / "worker.log",
                           env=moto_server.aws_env())
    try:
        milter.start()
        worker.start()
        prom = prometheus_factory({"mxrules-milter": f"127.0.0.1:{milter_metrics}",
                                   "mxrules-worker": f"127.0.0.1:{worker_metrics}"},
                                  rule_files=[ALERTS])
        postfix = postfix_factory(milter=milter.postfix_spec, relay_port=smtp_sink.port)
        # Every series is scraped at its starting value before any mail: the alerts
        # see the dead letter as an increase, as they would in production.
        prom.wait_for('up{job=~"mxrules-milter|mxrules-worker"}',
                      equals({"mxrules-milter": 1, "mxrules-worker": 1}, "job"))
        secret = f"body-{uuid.uuid4().hex}"

        def deliver(rcpts: list[str], **kw: Any) -> Any:
            msg = message("a@sender.test", rcpts, subject=f"subject-{secret}",
                          body=f"{secret}\r\n")
            return send("127.0.0.1", postfix.smtp_port, "a@sender.test", rcpts, msg, **kw)

        r = deliver(["user@example.com"])
        assert r.data is not None and r.data[0] == 250, r
        r = deliver(["user@example.com", "nobody@example.com", "friend@elsewhere.test"])
        assert r.rcpts["nobody@example.com"][0] == 550, r
        assert r.data is not None and r.data[0] == 250, r
        r = deliver(["user@example.com"], client_ip="192.0.2.9")  # IP filter bad-net
        assert r.data is None, r
        r = deliver(["friend@elsewhere.test"])  # nothing for mxrules: passed through
        assert r.data is not None and r.data[0] == 250, r
        r = deliver(["broken@example.com"])
        assert r.data is not None and r.data[0] == 250, r
        spool = Spool(str(directory / "spool"))
        wait_idle(spool)
        assert len(spool.ids("failed")) == 1
        keys = moto_server.s3_keys(bucket, "mail/")
        assert len(keys) == 2

        retries = _assert_series(prom)
        _assert_alerts(prom)
        _assert_dashboard_queries_run(prom)
        _assert_decision_logs(milter.log(), worker.log(), secret, keys, retries)
    finally:
        worker.stop()
        milter.stop()


def _assert_series(prom: PrometheusServer) -> int:
    """The counts of the mail sent, as Prometheus scraped them; returns the S3 retries."""
    prom.wait_for('mxrules_actions_total{job="mxrules-worker", type="S3", outcome=~"ok|failed"}',
                  equals({"ok": 2, "failed": 1}, "outcome"))
    prom.wait_for('mxrules_messages_total{job="mxrules-milter"}',
                  equals({"spooled": 3, "passed": 1, "tempfail": 0, "rejected": 0}, "result"))
    assert prom.values('sum by (reason) (mxrules_rejections_total{job="mxrules-milter"})',
                       "reason") == {"no-rule": 1, "block-filter": 1}
    assert prom.values('mxrules_recipients_total{job="mxrules-milter", result!="tls-required",'
                       ' result!="no-rule-set", result!="bounced",'
                       ' result!="too-big"}', "result") == {
        "accepted": 3, "no-rule": 1, "unmanaged": 2}
    assert prom.values('mxrules_connections_total{result="rejected"}', "result") == {
        "rejected": 1}
    assert prom.values("mxrules_rule_matches_total", "rule") == {"store": 2, "broken": 1}
    assert prom.values("mxrules_received_chunks_total", "job") == {"mxrules-milter": 3}
    prom.wait_for('mxrules_jobs_total{result=~"done|dead_lettered"}',
                  equals({"done": 2, "dead_lettered": 1}, "result"))
    assert prom.values("mxrules_dead_letters_total", "job") == {"mxrules-worker": 1}
    prom.wait_for('mxrules_spool_jobs{state=~"incoming|active|deferred|failed"}',
                  equals({"incoming": 0, "active": 0, "deferred": 0, "failed": 1}, "state"))
    [retries] = prom.values('mxrules_actions_total{type="S3", outcome="retry"}',
                            "outcome").values()
    assert retries >= 1
    assert prom.values('mxrules_action_errors_total{type="S3"}', "reason") == {
        "not-found": retries + 1}
    assert prom.values("mxrules_action_duration_seconds_count", "type") == {"S3": retries + 3}
    assert prom.values("mxrules_config_last_reload_successful", "job") == {
        "mxrules-milter": 1, "mxrules-worker": 1}
    return int(retries)


def _assert_alerts(prom: PrometheusServer) -> None:
    """The shipped rules evaluate cleanly; the dead letter fires its alert at once, the
    failing S3 attempts make the error-ratio alert pending (it waits 10 minutes)."""
    deadline = time.monotonic() + 10
    while True:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        evaluated = [r for r in rules if not r["lastEvaluation"].startswith("0001")]
        if len(rules) == 8 and len(evaluated) == len(rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.2)
    assert [(r["name"], r["health"], r.get("lastError")) for r in rules
            if r["health"] != "ok"] == []

    def states(result: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {(a["metric"]["alertname"], a["metric"]["alertstate"],
                 a["metric"].get("type", "")) for a in result}

    prom.wait_for("ALERTS", lambda result: states(result) == {
        ("MxrulesDeadLetters", "firing", ""), ("MxrulesActionErrors", "pending", "S3")})


def _assert_dashboard_queries_run(prom: PrometheusServer) -> None:
    exprs = dashboard_expressions()
    for where, expr in exprs.items():
        if expr.startswith("label_values("):
            metric = expr.removeprefix("label_values(").split(",")[0]
            assert {r["metric"]["instance"] for r in prom.query(metric)}, where
        else:
            prom.query(concrete(expr))  # an error status fails inside query()
    # Mail flow, rejections, actions, latency and the backlog have data (a rate
    # needs two scrapes of a series, so wait a little for the newest ones).
    for panel in ("Connections", "Messages", "Recipients", "Rejections by reason",
                  "Action attempts", "Action latency", "Jobs by state", "Oldest job"):
        prom.wait_for(concrete(exprs[f"panel {panel!r} A"]), bool, timeout=10)


def _assert_decision_logs(milter_log: str, worker_log: str, secret: str,
                          keys: list[str], retries: int) -> None:
    assert secret not in milter_log and secret not in worker_log  # no bodies, no subjects
    connects = lines(milter_log, "connect")
    assert [c["result"] for c in connects].count("reject") == 1
    assert next(c for c in connects if c["result"] == "reject")["reason"] == "block-filter"
    assert len([c for c in connects if c["result"] == "accept"]) >= 5
    rcpts = {r["rcpt"]: r for r in lines(milter_log, "rcpt")}
    assert rcpts["nobody@example.com"]["result"] == "no-rule"
    assert rcpts["friend@elsewhere.test"]["result"] == "unmanaged"
    assert rcpts["user@example.com"]["rules"] == "store"
    assert [e["result"] for e in lines(milter_log, "eom")].count("passed") == 1
    eoms = [e for e in lines(milter_log, "eom") if e["result"] == "spooled"]
    queue_ids = {e["message_id"]: e["queue_id"] for e in eoms}
    assert len(queue_ids) == 3 and len(set(queue_ids.values())) == 3
    assert all(re.fullmatch(r"[0-9A-Za-z]{6,}", q) for q in queue_ids.values()), queue_ids
    # Postfix names the queue file at the first valid recipient: later RCPT lines carry it.
    assert rcpts["nobody@example.com"].get("queue_id") in queue_ids.values()
    stored = {k.removeprefix("mail/") for k in keys}
    [broken] = set(queue_ids) - stored

    # One line per action attempt, each with the message id and queue id.
    actions = lines(worker_log, "action ok")
    assert sorted(a["message_id"] for a in actions) == sorted(stored)
    for a in actions:
        assert a["type"] == "S3" and a["rule"] == "store" and a["action"] == "1"
        assert a["queue_id"] == queue_ids[a["message_id"]]
        assert a["detail"].startswith(f"stored s3://mail-bucket/mail/{a['message_id']}")
    failed = lines(worker_log, "action failed, will retry")
    assert len(failed) == retries
    [given_up] = lines(worker_log, "action failed for good")
    for line in (*failed, given_up):
        assert (line["message_id"], line["queue_id"]) == (broken, queue_ids[broken])
        assert (line["rule"], line["type"], line["reason"]) == ("broken", "S3", "not-found")
    [dead] = lines(worker_log, "job dead-lettered")
    assert (dead["message_id"], dead["queue_id"], dead["failed"]) == (
        broken, queue_ids[broken], "broken#1")
    done = lines(worker_log, "job done")
    assert {d["message_id"]: d["queue_id"] for d in done} == {
        m: q for m, q in queue_ids.items() if m in stored}
    assert milter_log.count("WARNING") == milter_log.count("ERROR") == 0
    problems = [p for p in worker_log.splitlines() if p.startswith(("WARNING", "ERROR"))]
    assert len(problems) == retries + 2  # the retries, the action given up, the dead letter
