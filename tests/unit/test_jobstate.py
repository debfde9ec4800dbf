"""Every transition of a job's progress (mxrules.jobstate), as tables: pure, no spool, no clock."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import pytest

from harness.jobs import make_job
from mxrules import jobstate
from mxrules.actions.retry import RetryPolicy
from mxrules.errors import CorruptJobError
from mxrules.job import Job, MatchedRule, Progress
from mxrules.jobstate import Disposition, Failure, Next, Phase, Stopped
from mxrules.rules import (
    Action,
    AddHeaderAction,
    LambdaAction,
    Rule,
    S3Action,
    StopAction,
)

TOPIC = "arn:aws:sns:us-east-1:123456789012:t"
FN = "arn:aws:lambda:us-east-1:123456789012:function:f"
HEADER = AddHeaderAction(header_name="X-A", header_value="1")
S3 = S3Action(bucket_name="b")
S3_TOPIC = S3Action(bucket_name="b", topic_arn=TOPIC)
LAMBDA = LambdaAction(function_arn=FN, invocation_type="RequestResponse", topic_arn=TOPIC)


def _job(*rules: tuple[Action, ...], **progress: Any) -> Job:
    return make_job(message_id="m", queue_id="Q", mail_from="a@example.net",
                    recipients=("u@example.com",),
                    rules=tuple(MatchedRule(Rule(name=f"r{i}", enabled=True, actions=actions),
                                            ("u@example.com",))
                                for i, actions in enumerate(rules)),
                    message_size=1, message_sha256="0" * 64, progress=Progress(**progress))


def _at(job: Job) -> tuple[int, int, str, str, str]:
    p = job.progress
    return p.rule, p.action, p.phase, p.disposition, p.stopped


PLAN = ((HEADER, LAMBDA, S3), (S3,))


@pytest.mark.parametrize(("disposition", "at"), [
    pytest.param("CONTINUE", (0, 2, "action", "", ""), id="continue-next-action"),
    pytest.param("", (0, 2, "action", "", ""), id="none-next-action"),
    pytest.param("STOP_RULE", (1, 0, "action", "", ""), id="stop-rule-next-rule"),
    pytest.param("STOP_RULE_SET", (0, 1, "action", "", "rule_set"), id="stop-rule-set-ends"),
])
def test_advance_after_a_disposition(disposition: str, at: tuple[Any, ...]) -> None:
    failure = Failure.of("Lambda", Phase.ACTION, "timeout", "slow")
    job = _job(*PLAN, action=1, attempts=3, first_attempt_at=5.0, next_due=9.0,
               last_error=failure.text, failure=failure)
    after = jobstate.advance(job, disposition)
    assert _at(after) == at
    p = after.progress
    assert (p.attempts, p.first_attempt_at, p.next_due, p.last_error, p.failure) == \
        (0, None, 0.0, "", None)


@pytest.mark.parametrize(("notify", "disposition", "at"), [
    pytest.param(False, "CONTINUE", (0, 2, "action", "", ""), id="no-topic-continue"),
    pytest.param(False, "STOP_RULE", (1, 0, "action", "", ""), id="no-topic-stop-rule"),
    pytest.param(False, "STOP_RULE_SET", (0, 1, "action", "", "rule_set"),
                 id="no-topic-stop-rule-set"),
    pytest.param(True, "CONTINUE", (0, 1, "notify", "CONTINUE", ""), id="topic-continue-waits"),
    pytest.param(True, "STOP_RULE_SET", (0, 1, "notify", "STOP_RULE_SET", ""),
                 id="topic-stop-rule-set-waits-for-notification"),
])
def test_ran(notify: bool, disposition: str, at: tuple[Any, ...]) -> None:
    job = _job(*PLAN, action=1, added_headers=(("X-A", "1"),), done=("one",))
    after = jobstate.ran(job, disposition=disposition, notify=notify, header=("X-B", "2"),
                         done="two")
    assert _at(after) == at
    assert after.progress.added_headers == (("X-A", "1"), ("X-B", "2"))
    assert after.progress.done == ("one", "two")


@pytest.mark.parametrize(("disposition", "at"), [
    pytest.param("CONTINUE", (0, 2, "action", "", ""), id="continue"),
    pytest.param("", (0, 2, "action", "", ""), id="none-is-continue"),
    pytest.param("STOP_RULE", (1, 0, "action", "", ""), id="stop-rule"),
    pytest.param("STOP_RULE_SET", (0, 1, "action", "", "rule_set"), id="stop-rule-set"),
])
def test_notified_applies_the_actions_disposition(disposition: str, at: tuple[Any, ...]) -> None:
    job = _job(*PLAN, action=1, phase="notify", disposition=disposition)
    assert _at(jobstate.notified(job)) == at


def test_a_stop_action_with_a_topic_stops_after_its_notification() -> None:
    job = _job((StopAction(topic_arn=TOPIC), S3))
    ran = jobstate.ran(job, disposition="STOP_RULE_SET", notify=True, header=None, done="x")
    assert _at(ran) == (0, 0, "notify", "STOP_RULE_SET", "")
    assert jobstate.settle(jobstate.notified(ran))[1] is Next.FINISH


class _Policy:
    """RetryPolicy's answers, fixed: whether it gives up, and a delay of 7 s."""

    def __init__(self, gives_up: bool) -> None:
        self.give_up = gives_up

    def gives_up(self, first_failure: float, now: float, *, permanent: bool = False) -> bool:
        return permanent or self.give_up

    def delay(self, attempts: int, rand: Any) -> float:
        return 7.0


@pytest.mark.parametrize(("permanent", "window_over", "go_on", "phase", "disposition", "next_",
                          "at"), [
    pytest.param(False, False, True, "action", "", Next.RETRY, (0, 1, "action", "", ""),
                 id="transient-retry"),
    pytest.param(True, False, True, "action", "", Next.GIVEN_UP, (0, 2, "action", "", ""),
                 id="permanent-given-up-plan-goes-on"),
    pytest.param(False, True, True, "action", "", Next.GIVEN_UP, (0, 2, "action", "", ""),
                 id="window-over-given-up"),
    pytest.param(False, True, True, "notify", "STOP_RULE", Next.GIVEN_UP,
                 (1, 0, "action", "", ""), id="failed-notification-keeps-stop-rule"),
    pytest.param(False, True, True, "notify", "STOP_RULE_SET", Next.GIVEN_UP,
                 (0, 1, "action", "", "rule_set"), id="failed-notification-keeps-stop-rule-set"),
    pytest.param(False, False, False, "action", "", Next.RETRY, (0, 1, "action", "", ""),
                 id="outside-actions-retry"),
    pytest.param(True, False, False, "action", "", Next.DEAD_LETTER_NOW,
                 (0, 1, "action", "", ""), id="outside-actions-dead-letter-where-it-stands"),
])
def test_failed(permanent: bool, window_over: bool, go_on: bool, phase: str, disposition: str,
                next_: Next, at: tuple[Any, ...]) -> None:
    job = _job(*PLAN, action=1, phase=phase, disposition=disposition, attempts=2,
               first_attempt_at=50.0)
    failure = Failure.of("Lambda", Phase(phase), "permanent" if permanent else "timeout", "x")
    t = jobstate.failed(job, failure, now=100.0, permanent=permanent, policy=_Policy(window_over),
                        rand=lambda: 0.0, go_on=go_on)
    assert (t.next, _at(t.job), t.attempts) == (next_, at, 3)
    p = t.job.progress
    assert (p.failure, p.last_error) == (failure, failure.text)
    if next_ is Next.GIVEN_UP:
        assert p.failed == ((0, 1, phase),)
        assert p.done[-1].startswith("rule r0 action 2 Lambda: FAILED after 3 attempts: ")
    else:
        assert p.failed == ()
        assert (p.attempts, p.first_attempt_at) == (3, 50.0)
    if next_ is Next.RETRY:
        assert (p.next_due, t.delay) == (107.0, 7.0)


def test_the_first_failure_starts_the_retry_window() -> None:
    failure = Failure.of("S3", Phase.ACTION, "connection", "refused")
    t = jobstate.failed(_job(*PLAN), failure, now=100.0, permanent=False,
                        policy=RetryPolicy(window=10.0), rand=lambda: 0.0)
    assert (t.next, t.job.progress.first_attempt_at, t.job.progress.attempts) == \
        (Next.RETRY, 100.0, 1)


@pytest.mark.parametrize(("progress", "next_", "at"), [
    pytest.param({}, Next.RUN, (0, 0, "action", "", ""), id="start"),
    pytest.param({"rule": 2}, Next.FINISH, (2, 0, "action", "", ""), id="past-last-rule"),
    pytest.param({"rule": 2, "failed": ((0, 1, "action"),)}, Next.DEAD_LETTER,
                 (2, 0, "action", "", ""), id="past-last-rule-with-failures"),
    pytest.param({"stopped": "rule_set"}, Next.FINISH, (0, 0, "action", "", "rule_set"),
                 id="stopped"),
    pytest.param({"action": 3}, Next.RUN, (1, 0, "action", "", ""), id="past-rule-end"),
    pytest.param({"only": ((1, 0, "action"),)}, Next.RUN, (0, 0, "action", "", ""),
                 id="requeued-runs-addheader-again"),
    pytest.param({"action": 1, "only": ((1, 0, "action"),)}, Next.RUN,
                 (1, 0, "action", "", ""), id="requeued-skips-what-ran"),
    pytest.param({"action": 1, "only": ((0, 1, "notify"),)}, Next.RUN,
                 (0, 1, "notify", "CONTINUE", ""), id="requeued-failed-notification-only"),
    pytest.param({"rule": 1, "only": ((0, 1, "action"),)}, Next.FINISH,
                 (2, 0, "action", "", ""), id="requeued-nothing-left"),
])
def test_settle(progress: dict[str, Any], next_: Next, at: tuple[Any, ...]) -> None:
    job, got = jobstate.settle(_job(*PLAN, **progress))
    assert (got, _at(job)) == (next_, at)


@pytest.mark.parametrize(("dead_letter", "at", "only"), [
    pytest.param(True, (0, 0, "action", "", ""), ((0, 1, "notify"),), id="dead-letter"),
    pytest.param(False, (1, 0, "action", "", ""), (), id="deferred"),
])
def test_requeued(dead_letter: bool, at: tuple[Any, ...], only: tuple[Any, ...]) -> None:
    job = _job(*PLAN, rule=1, attempts=4, next_due=99.0, first_attempt_at=1.0,
               failed=((0, 1, "notify"),), added_headers=(("X-A", "1"),))
    after = jobstate.requeued(job, dead_letter=dead_letter)
    p = after.progress
    assert (_at(after), p.only, p.attempts, p.next_due, p.first_attempt_at) == \
        (at, only, 0, 0.0, None)
    assert p.added_headers == (() if dead_letter else (("X-A", "1"),))


@pytest.mark.parametrize(("text", "failure", "waits_on"), [
    pytest.param("S3 action: connection: refused: twice", Failure(
        "S3", Phase.ACTION, "connection", True, "refused: twice"), "S3", id="transient"),
    pytest.param("S3 notification: timeout: slow", Failure(
        "S3", Phase.NOTIFY, "timeout", True, "slow"), "SNS", id="notification-waits-on-sns"),
    pytest.param("Bounce action: access-denied: no", Failure(
        "Bounce", Phase.ACTION, "access-denied", False, "no"), "", id="not-transient"),
    pytest.param("- action: unexpected: bug", Failure(
        "-", Phase.ACTION, "unexpected", False, "bug"), "", id="outside-actions"),
    pytest.param("", None, "", id="none"),
    pytest.param("written by hand", None, "", id="not-a-failure-text"),
])
def test_a_failure_text_from_an_older_spool(text: str, failure: Failure | None,
                                            waits_on: str) -> None:
    got = Failure.from_text(text)
    assert got == failure
    if got:
        assert (got.text, got.waits_on) == (text, waits_on)


def _raw(job: Job, **progress: Any) -> bytes:
    """job.json as encoded, with progress fields replaced (None: removed), checksum redone."""
    outer = json.loads(job.encode())
    for key, value in progress.items():
        if value is None:
            del outer["job"]["progress"][key]
        else:
            outer["job"]["progress"][key] = value
    text = json.dumps(outer["job"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    outer["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return json.dumps(outer).encode()


def test_a_job_round_trips_with_typed_progress_and_its_failure() -> None:
    failure = Failure.of("Lambda", Phase.NOTIFY, "throttled", "Rate exceeded")
    job = _job(*PLAN, action=1, phase="notify", disposition="STOP_RULE", failure=failure,
               last_error=failure.text, failed=((0, 0, "action"),))
    back = Job.decode(job.encode())
    assert back == job
    p = back.progress
    assert (type(p.phase), type(p.disposition), type(p.stopped), type(p.failed[0][2])) == \
        (Phase, Disposition, Stopped, Phase)


def test_a_job_from_an_older_spool_gets_its_failure_from_the_text() -> None:
    job = _job(*PLAN, last_error="S3 action: connection: refused", attempts=1)
    back = Job.decode(_raw(job, failure=None))
    assert back.progress.failure == Failure("S3", Phase.ACTION, "connection", True, "refused")
    assert back.progress.last_error == "S3 action: connection: refused"


@pytest.mark.parametrize("failure", [
    pytest.param("text", id="not-an-object"),
    pytest.param({"type": "S3", "phase": "later", "reason": "r", "transient": True,
                  "detail": ""}, id="unknown-phase"),
    pytest.param({"type": "S3", "phase": "action", "reason": "r", "transient": 1,
                  "detail": ""}, id="transient-not-bool"),
    pytest.param({"type": "S3", "phase": "action", "reason": 5, "transient": False,
                  "detail": ""}, id="reason-not-text"),
    pytest.param({"type": "S3", "phase": "action", "reason": "r", "transient": False,
                  "detail": "", "extra": 1}, id="unknown-field"),
])
def test_a_bad_failure_record_is_corrupt(failure: Any) -> None:
    with pytest.raises(CorruptJobError, match=r"progress\.failure"):
        Job.decode(_raw(_job(*PLAN), failure=failure))


def test_requeueing_with_no_failed_action_only_renews_the_retry_window() -> None:
    job = _job(*PLAN, done=("a",))
    assert replace(jobstate.requeued(job, dead_letter=True).progress, done=()) == Progress()
