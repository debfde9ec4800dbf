"""Running a job's plan: an action given up on never keeps the others from running.

The actions are stand-ins recording their calls (the real ones talk to AWS and SMTP
and are tested against moto and aiosmtpd in tests/integration/); the spool, the
progress records and the runner are the real ones.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from harness.jobs import make_job
from mxrules import config as config_mod
from mxrules.actions import runner as runner_mod
from mxrules.actions.base import ActionContext, Outcome, PermanentActionError
from mxrules.actions.retry import RetryPolicy
from mxrules.actions.runner import Runner
from mxrules.actions.worker import RETENTION_INTERVAL, Worker
from mxrules.config import WorkerSettings
from mxrules.ids import new_message_id
from mxrules.metrics import WorkerMetrics
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
from mxrules.spool import MatchedRule, Spool

TOPIC = "arn:aws:sns:us-east-1:123456789012:t"
FN = "arn:aws:lambda:us-east-1:123456789012:function:f"


@dataclass
class Calls:
    """What ran, in order (`TYPE` or `TYPE notify`), and the steps that must fail."""

    log: list[str] = field(default_factory=list)
    failing: set[tuple[int, int, str]] = field(default_factory=set)  # (rule, action, phase)
    disposition: str = "CONTINUE"

    def _step(self, ctx: ActionContext, phase: str, name: str) -> None:
        self.log.append(name)
        if (ctx.rule_index, ctx.action_index, phase) in self.failing:
            raise PermanentActionError(f"{name} cannot be done")

    def action(self, ctx: ActionContext) -> Outcome:
        self._step(ctx, "action", ctx.action.TYPE)
        if isinstance(ctx.action, AddHeaderAction):
            return Outcome(header=(ctx.action.header_name, ctx.action.header_value))
        if isinstance(ctx.action, StopAction):
            return Outcome(disposition="STOP_RULE_SET")
        if isinstance(ctx.action, LambdaAction):
            return Outcome(disposition=self.disposition)  # type: ignore[arg-type]
        return Outcome()

    def notify(self, ctx: ActionContext, topic_arn: str) -> str:
        self._step(ctx, "notify", f"{ctx.action.TYPE} notify")
        return "notified"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    recorder = Calls()
    actions: dict[str, Callable[[ActionContext], Outcome]] = {
        key: recorder.action for key in runner_mod.ACTIONS}
    monkeypatch.setattr(runner_mod, "ACTIONS", actions)
    monkeypatch.setattr(runner_mod.sns, "notify", recorder.notify)
    yield recorder


def _spooled(spool: Spool, *rules: Rule) -> str:
    writer = spool.new_job(new_message_id())
    data = b"Subject: x\r\n\r\nbody\r\n"
    writer.write(data)
    job = make_job(data, message_id=writer.message_id, queue_id="Q1",
                   mail_from="a@example.net", recipients=("u@example.com",),
                   rules=tuple(MatchedRule(r, ("u@example.com",)) for r in rules))
    writer.commit(job)
    return job.message_id


def _run(spool: Spool, state: str, job_id: str, metrics: WorkerMetrics) -> str:
    claim = spool.claim(state, job_id)
    assert claim is not None
    # A retry window of 0: every failure is given up on at once.
    runner = Runner(WorkerSettings(), None, metrics, RetryPolicy(window=0.0),
                    threading.Event())
    try:
        return runner.run(claim)
    finally:
        claim.release()


def _rule(name: str, *actions: Action) -> Rule:
    return Rule(name=name, enabled=True, actions=actions)


ALL = ["AddHeader", "S3", "S3 notify", "SNS", "Lambda", "Bounce", "S3"]


# Which step fails for good, in a plan with every kind of action: everything after it
# runs (a failed action's own topic_arn notification excepted: it did not happen).
@pytest.mark.parametrize("step, ran, again", [
    pytest.param((0, 1, "action"), [n for n in ALL if n != "S3 notify"], ["S3", "S3 notify"],
                 id="s3"),
    pytest.param((0, 1, "notify"), ALL, ["S3 notify"], id="s3-topic-notification"),
    pytest.param((0, 2, "action"), ALL, ["SNS"], id="sns"),
    pytest.param((0, 3, "action"), ALL, ["Lambda"], id="lambda-request-response"),
    pytest.param((1, 0, "action"), ALL, ["Bounce"], id="bounce"),
    pytest.param((1, 1, "action"), ALL, ["S3"], id="last-action"),
])
def test_an_action_given_up_on_never_stops_the_others(
        tmp_path: Path, calls: Calls, step: tuple[int, int, str], ran: list[str],
        again: list[str]) -> None:
    spool = Spool(str(tmp_path))
    first = _rule("first", AddHeaderAction(header_name="X-A", header_value="1"),
                  S3Action(bucket_name="b", topic_arn=TOPIC), SNSAction(topic_arn=TOPIC),
                  LambdaAction(function_arn=FN, invocation_type="RequestResponse"))
    second = _rule("second", BounceAction(smtp_reply_code="550", message="no", sender="m@x"),
                   S3Action(bucket_name="c"))
    job_id = _spooled(spool, first, second)
    calls.failing = {step}
    metrics = WorkerMetrics(CollectorRegistry())
    assert _run(spool, "incoming", job_id, metrics) == "failed"
    assert calls.log == ran
    job = spool.load("failed", job_id)
    assert job.progress.failed == (step,)
    assert sum("FAILED after 1 attempt:" in line for line in job.progress.done) == 1
    kind = again[0].split()[0]
    assert metrics.registry.get_sample_value(
        "mxrules_actions_total", {"type": kind, "outcome": "failed"}) == 1
    assert metrics.registry.get_sample_value("mxrules_dead_letters_total") == 1

    # Requeued and mended: only the failed step runs again, with the AddHeader the
    # stored copies need; the job is then done.
    calls.log.clear()
    calls.failing = set()
    spool.requeue(job_id)
    assert _run(spool, "incoming", job_id, metrics) == "done"
    assert calls.log == ["AddHeader", *again]
    assert spool.find(job_id) is None


def test_a_failed_stop_notification_still_stops_the_rule_set(tmp_path: Path,
                                                             calls: Calls) -> None:
    spool = Spool(str(tmp_path))
    job_id = _spooled(spool, _rule("first", StopAction(topic_arn=TOPIC), S3Action(bucket_name="b")),
                      _rule("second", S3Action(bucket_name="c")))
    calls.failing = {(0, 0, "notify")}
    assert _run(spool, "incoming", job_id, WorkerMetrics(CollectorRegistry())) == "failed"
    assert calls.log == ["Stop", "Stop notify"]
    calls.log.clear()
    calls.failing = set()
    spool.requeue(job_id)
    assert _run(spool, "incoming", job_id, WorkerMetrics(CollectorRegistry())) == "done"
    assert calls.log == ["Stop notify"]


def test_a_requeued_lambda_may_still_stop_the_rule(tmp_path: Path, calls: Calls) -> None:
    """The failed action runs again as itself: its disposition counts for what follows it
    among the actions still to run (none of those that ran the first time run again)."""
    spool = Spool(str(tmp_path))
    job_id = _spooled(spool, _rule("first", LambdaAction(function_arn=FN,
                                                         invocation_type="RequestResponse"),
                                   S3Action(bucket_name="b"), SNSAction(topic_arn=TOPIC)))
    calls.failing = {(0, 0, "action"), (0, 2, "action")}
    assert _run(spool, "incoming", job_id, WorkerMetrics(CollectorRegistry())) == "failed"
    assert calls.log == ["Lambda", "S3", "SNS"]
    calls.log.clear()
    calls.failing = set()
    calls.disposition = "STOP_RULE"
    spool.requeue(job_id)
    assert _run(spool, "incoming", job_id, WorkerMetrics(CollectorRegistry())) == "done"
    assert calls.log == ["Lambda"]


def test_a_job_without_failures_is_done(tmp_path: Path, calls: Calls) -> None:
    spool = Spool(str(tmp_path))
    job_id = _spooled(spool, _rule("only", S3Action(bucket_name="b")))
    assert _run(spool, "incoming", job_id, WorkerMetrics(CollectorRegistry())) == "done"
    assert calls.log == ["S3"] and spool.find(job_id) is None


# -- the dead letters' retention pass ---------------------------------------------------

def test_retention_pass_removes_counts_and_reports(tmp_path: Path, calls: Calls,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mxrules.yaml"
    path.write_text(f"spool: {{directory: {tmp_path / 'spool'}, failed_max_age: 100, "
                    "failed_max_size: 0}\nmetrics: {worker_listen: ''}\n")
    registry = CollectorRegistry()
    worker = Worker(config_mod.load(str(path)), registry)
    ids = [_spooled(worker.spool, _rule("r", S3Action(bucket_name="b"))) for _ in range(2)]
    calls.failing = {(0, 0, "action")}
    for job_id in ids:
        assert _run(worker.spool, "incoming", job_id, worker.metrics) == "failed"
    old, new = ids
    os.utime(os.path.join(worker.spool.path("failed", old), "job.json"), (1000.0, 1000.0))
    os.utime(os.path.join(worker.spool.path("failed", new), "job.json"), (1050.0, 1050.0))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    # At 1120 the older is past 100 s; the newer expires at 1150: the next pass is due in 30 s.
    assert worker.enforce_retention(now=1120.0) == pytest.approx(30.0)
    assert worker.spool.ids("failed") == [new]
    assert value("mxrules_dead_letters_removed_total", reason="age") == 1
    assert value("mxrules_dead_letter_oldest_age_seconds") == pytest.approx(70.0)
    size = sum(e.stat().st_size for e in os.scandir(worker.spool.path("failed", new)))
    assert value("mxrules_dead_letter_bytes") == size
    assert value("mxrules_dead_letter_retention_age_seconds") == 100
    assert value("mxrules_dead_letter_retention_bytes") == 0
    assert f"dead letter removed by retention message_id={old} reason=age" in caplog.text
    # None left: the next pass is a minute away at most.
    assert worker.enforce_retention(now=1200.0) == RETENTION_INTERVAL
    assert worker.spool.ids("failed") == [] and value("mxrules_dead_letter_bytes") == 0
