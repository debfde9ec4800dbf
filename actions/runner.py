"""Running one claimed job: its matched rules' actions, in order, exactly once each.

Progress is saved after every action (write, fsync, rename), so a crash
repeats at most the one action that was in flight.  An action with a
`topic_arn` is done in two saved steps -- the action, then its notification --
so a failed publish never repeats the action.  Dispositions follow SES: a Stop
action or a Lambda's STOP_RULE_SET ends the job, STOP_RULE ends the rule.

A failing action is retried, the job waiting, for the retry window.  Once given
up on (the window is over, or the failure is permanent), the action is recorded
as failed and the plan goes on: one action that cannot be done never keeps the
others of the plan from running (README, "When an action fails").  A job with
failed actions ends in failed/, where `mxrules spool requeue` runs only those
again (with the AddHeaders, which only shape the stored copies).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mxrules.config import WorkerSettings
from mxrules.errors import SpoolError
from mxrules.metrics import WorkerMetrics
from mxrules.rules import AddHeaderAction, SNSAction
from mxrules.service import kv
from mxrules.spool import Claim, Job, message_time, with_progress

from . import add_header, bounce, lambda_invoke, s3, sns, stop
from .aws import Clients, classify
from .base import ActionContext, Outcome, PermanentActionError
from .bounce_limit import BounceLimiter
from .retry import RetryPolicy

log = logging.getLogger("mxrules.worker")

ACTIONS: dict[str, Callable[[ActionContext], Outcome]] = {
    "add_header": add_header.run,
    "s3": s3.run,
    "sns": sns.run,
    "lambda": lambda_invoke.run,
    "bounce": bounce.run,
    "stop": stop.run,
}


def advance(job: Job, disposition: str) -> Job:
    """The progress after the current action answered `disposition`."""
    p = job.progress
    reset = {"attempts": 0, "first_attempt_at": None, "next_due": 0.0, "last_error": "",
             "phase": "action", "disposition": ""}
    if disposition == "STOP_RULE_SET":
        return with_progress(job, stopped="rule_set", **reset)
    if disposition == "STOP_RULE":
        return with_progress(job, rule=p.rule + 1, action=0, **reset)
    return with_progress(job, action=p.action + 1, **reset)


def wanted(job: Job) -> str | None:
    """The phase to run at the job's (rule, action), or None to pass it by.

    Every action runs, except in a requeued dead letter (`progress.only`): there
    only the actions that had failed run, and the AddHeaders (local, and needed
    for the stored copies to be the same as the first time).
    """
    p = job.progress
    if not p.only:
        return p.phase
    phases = {phase for rule, action, phase in p.only if (rule, action) == (p.rule, p.action)}
    if "action" in phases or (p.phase == "notify" and phases):
        return p.phase
    if phases:
        return "notify"  # the action ran the first time; only its notification failed
    # An AddHeader runs again, but its notification (if any) was sent the first time.
    actions = job.rules[p.rule].rule.actions
    if isinstance(actions[p.action], AddHeaderAction) and p.phase == "action":
        return "action"
    return None


def complete(job: Job) -> bool:
    """No action is left: the rule set was stopped, or every matched rule's actions ran."""
    p = job.progress
    if p.stopped:
        return True
    return all(p.action >= len(m.rule.actions) if i == p.rule else not m.rule.actions
               for i, m in enumerate(job.rules[p.rule:], start=p.rule))


@dataclass
class Runner:
    settings: WorkerSettings
    clients: Clients
    metrics: WorkerMetrics
    policy: RetryPolicy
    stopping: threading.Event
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    # Called with the action type when an action succeeds that had failed before:
    # what it failed to reach is back (the worker then retries the jobs waiting on it).
    recovered: Callable[[str], None] | None = None
    # The worker's DSN counts; one per process, shared by its threads and reloads.
    bounce_limiter: BounceLimiter = field(default_factory=BounceLimiter)
    # Called when a job has been moved to failed/ (the dead letters' retention may act).
    dead_lettered: Callable[[], None] | None = None

    def run(self, claim: Claim) -> str:
        """Work a job until it is done, deferred or dead; returns which."""
        job = claim.job
        while True:
            p = job.progress
            if (p.stopped or p.rule >= len(job.rules)) and p.failed:
                return self._dead_letter(claim, job)
            if p.stopped or p.rule >= len(job.rules):
                try:
                    claim.finish(job)
                except OSError:
                    if claim.fd >= 0:  # neither moved nor saved: hold it until saved
                        self._save(claim, job)
                    raise
                self.metrics.jobs.labels("done").inc()
                latency = self.clock() - message_time(job.message_id)
                self.metrics.job_seconds.observe(max(0.0, latency))
                log.info("job done %s", kv(message_id=job.message_id, queue_id=job.queue_id,
                                           actions=len(p.done),
                                           stopped="rule-set" if p.stopped else None,
                                           ms=int(max(0.0, latency) * 1000)))
                return "done"
            matched = job.rules[p.rule]
            if p.action >= len(matched.rule.actions):
                job = with_progress(job, rule=p.rule + 1, action=0)
                continue
            phase = wanted(job)
            if phase is None:
                job = with_progress(job, action=p.action + 1, phase="action", disposition="")
                continue
            if phase != p.phase:
                job = with_progress(job, phase=phase, disposition="CONTINUE")
                p = job.progress
            if self.stopping.is_set():
                # Draining: hand the job back, due now, for the next worker to go on.
                claim.move("deferred")
                return "deferred"
            action = matched.rule.actions[p.action]
            ctx = ActionContext(job=job, matched=matched, action=action, rule_index=p.rule,
                                action_index=p.action, message_path=claim.message_path,
                                added_headers=p.added_headers, clients=self.clients,
                                settings=self.settings, bounce_limiter=self.bounce_limiter)
            started = time.monotonic()
            try:
                if p.phase == "action":
                    outcome = ACTIONS[action.KEY](ctx)
                    self.metrics.actions.labels(
                        action.TYPE, "bounced" if outcome.bounced else "ok").inc()
                    if p.attempts and self.recovered:
                        self.recovered(action.TYPE)
                    if action.TYPE == "Lambda":
                        self.metrics.dispositions.labels(outcome.disposition).inc()
                    if outcome.suppressed:
                        self._suppressed(job, matched.rule.name, p.action + 1, outcome)
                    added = p.added_headers + ((outcome.header,) if outcome.header else ())
                    done = (*p.done, f"rule {matched.rule.name} action {p.action + 1} "
                                     f"{action.TYPE}: {outcome.detail}")
                    job = with_progress(job, added_headers=added, done=done)
                    log.info("action ok %s", kv(
                        message_id=job.message_id, queue_id=job.queue_id, rule=matched.rule.name,
                        action=p.action + 1, type=action.TYPE, detail=outcome.detail,
                        ms=int((time.monotonic() - started) * 1000)))
                    if (action.topic_arn and not isinstance(action, SNSAction)
                            and not outcome.bounced):
                        job = with_progress(job, phase="notify",
                                            disposition=outcome.disposition, attempts=0,
                                            first_attempt_at=None, last_error="")
                    else:
                        job = advance(job, outcome.disposition)
                    self._record(claim, job)
                else:
                    assert action.topic_arn
                    note = sns.notify(ctx, action.topic_arn)
                    self.metrics.notifications.labels(action.TYPE).inc()
                    if p.attempts and self.recovered:
                        self.recovered("SNS")
                    log.info("action notified %s", kv(
                        message_id=job.message_id, queue_id=job.queue_id, rule=matched.rule.name,
                        action=p.action + 1, type=action.TYPE, detail=note,
                        ms=int((time.monotonic() - started) * 1000)))
                    job = advance(job, p.disposition or "CONTINUE")
                    self._record(claim, job)
            except SpoolError:
                raise  # the spool itself failed: the job stays in active/ for recovery
            except Exception as exc:
                result, job = self._failed(claim, job, action.TYPE, exc)
                if result != "given-up":
                    return result
            finally:
                self.metrics.action_seconds.labels(action.TYPE).observe(
                    time.monotonic() - started)

    def _suppressed(self, job: Job, rule: str, action: int, outcome: Outcome) -> None:
        """A Bounce that sent nothing on purpose: done, not failed, and never silent."""
        self.metrics.bounces_suppressed.labels(outcome.suppressed).inc()
        log.info("bounce suppressed %s", kv(
            message_id=job.message_id, queue_id=job.queue_id, rule=rule, action=action,
            reason=outcome.suppressed, sender=job.mail_from, client=job.client.address,
            spf=job.verdicts.get("spf"), dmarc=job.verdicts.get("dmarc")))

    def _record(self, claim: Claim, job: Job) -> None:
        """Make the progress after an action durable before anything else is done.

        While actions are left, that is a save (write, fsync, rename, fsync dir).  Once
        none is, the next step is Claim.finish: its rename out of active/ and fsync of
        active/ record "done" durably by themselves, so the save -- a job.json written
        and fsync'd only to be deleted -- is skipped (finish saves the job after all if
        it cannot move it).  Either way a crash repeats at most the action in flight.
        """
        if not complete(job):
            self._save(claim, job)

    def _save(self, claim: Claim, job: Job) -> None:
        """Save a job's progress, holding the job while the spool cannot take it.

        On a full disk the save fails.  Letting go of the job then would leave it in
        active/ with its last action not recorded, for the next scan to run that
        action again, and again, for as long as the disk stays full (a DSN or an SNS
        notification each time).  So the job is held and the save retried; only a
        drain gives up, and the next start repeats that one action.
        """
        delay = 0.1
        waited = False
        while True:
            try:
                claim.save(job)
            except OSError as exc:
                if not waited:
                    log.error("cannot save job progress, holding the job until the spool "
                              "takes it message_id=%s error=%s", job.message_id, exc)
                    waited = True
                if self.stopping.wait(delay):
                    raise SpoolError(f"cannot save job {job.message_id}: {exc}") from exc
                delay = min(2 * delay, 5.0)
                continue
            if waited:
                log.info("job progress saved after waiting message_id=%s", job.message_id)
            return

    def unexpected(self, claim: Claim, exc: Exception) -> str:
        """Back off a job that raised outside its actions' own handling (a bug).

        Without this its claim would simply end, leaving it in active/ for the next
        look to take again at once: a busy loop for as long as the error lasts.  It
        is recorded as a failure of its next action (the progress saved last) and
        retried with backoff, then dead-lettered at the end of the retry window.
        """
        job = claim.job
        p = job.progress
        try:
            kind = job.rules[p.rule].rule.actions[p.action].TYPE
        except IndexError:
            kind = "-"  # past its last action: it failed while finishing
        return self._failed(claim, job, kind, exc, go_on=False)[0]

    def _failed(self, claim: Claim, job: Job, kind: str, exc: Exception, *,
                go_on: bool = True) -> tuple[str, Job]:
        """Defer the job for a retry, or give the action up and go on ("given-up").

        Not `go_on` (an error outside the actions, a bug): given up, the whole job
        is dead-lettered where it stands.
        """
        p = job.progress
        now = self.clock()
        reason = classify(exc)
        first = p.first_attempt_at if p.first_attempt_at is not None else now
        attempts = p.attempts + 1
        step = "notification" if p.phase == "notify" else "action"
        error = f"{kind} {step}: {reason}: {exc}"[:1000]
        if kind != "-":
            self.metrics.action_errors.labels(kind, reason).inc()
        permanent = isinstance(exc, PermanentActionError)
        rule = job.rules[p.rule].rule.name if p.rule < len(job.rules) else "-"
        if self.policy.gives_up(first, now, permanent=permanent):
            if not go_on:
                return self._dead_letter_now(claim, job, kind, reason, attempts, first, error)
            self.metrics.actions.labels(kind, "failed").inc()
            log.error("action failed for good %s (the plan goes on without it)", kv(
                message_id=job.message_id, queue_id=job.queue_id, rule=rule, action=p.action + 1,
                type=kind, reason=reason, attempts=attempts, error=error))
            done = (*p.done, f"rule {rule} action {p.action + 1} {kind}: FAILED after "
                             f"{attempts} attempt{'s' if attempts != 1 else ''}: {error}")
            failed = (*p.failed, (p.rule, p.action, p.phase))
            # A failed notification leaves its action's disposition standing; a failed
            # RequestResponse Lambda gave none, and SES then goes on (CONTINUE).
            disposition = (p.disposition or "CONTINUE") if p.phase == "notify" else "CONTINUE"
            job = advance(job, disposition)
            job = with_progress(job, done=done, failed=failed, last_error=error)
            self._record(claim, job)
            return "given-up", job
        delay = self.policy.delay(attempts, self.rand)
        job = with_progress(job, attempts=attempts, first_attempt_at=first, last_error=error,
                            next_due=now + delay)
        self._save(claim, job)
        claim.move("deferred")
        if kind != "-":
            self.metrics.actions.labels(kind, "retry").inc()
        log.warning("action failed, will retry %s", kv(
            message_id=job.message_id, queue_id=job.queue_id, rule=rule, action=p.action + 1,
            type=kind, reason=reason, attempts=attempts, retry_in=f"{delay:.1f}s", error=error))
        return "deferred", job

    def _dead_letter_now(self, claim: Claim, job: Job, kind: str, reason: str, attempts: int,
                         first: float, error: str) -> tuple[str, Job]:
        p = job.progress
        rule = job.rules[p.rule].rule.name if p.rule < len(job.rules) else "-"
        job = with_progress(job, attempts=attempts, first_attempt_at=first, last_error=error)
        self._save(claim, job)
        claim.move("failed")
        if kind != "-":
            self.metrics.actions.labels(kind, "failed").inc()
        self.metrics.jobs.labels("dead_lettered").inc()
        self.metrics.dead_letters.inc()
        log.error("job dead-lettered %s (mxrules spool requeue %s)", kv(
            message_id=job.message_id, queue_id=job.queue_id, rule=rule, action=p.action + 1,
            type=kind, reason=reason, attempts=attempts, error=error), job.message_id)
        if self.dead_lettered:
            self.dead_lettered()
        return "failed", job

    def _dead_letter(self, claim: Claim, job: Job) -> str:
        """Every action has run or failed for good: the job waits in failed/ for an operator."""
        p = job.progress
        failed = [f"{job.rules[r].rule.name}#{a + 1}" + (" notification" if ph == "notify" else "")
                  for r, a, ph in p.failed]
        self._save(claim, job)
        claim.move("failed")
        self.metrics.jobs.labels("dead_lettered").inc()
        self.metrics.dead_letters.inc()
        log.error("job dead-lettered %s (mxrules spool requeue %s runs the failed actions "
                  "again)", kv(message_id=job.message_id, queue_id=job.queue_id,
                              failed=",".join(failed), error=p.last_error), job.message_id)
        if self.dead_lettered:
            self.dead_lettered()
        return "failed"
