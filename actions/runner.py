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

import importlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mxrules import jobstate
from mxrules.actionspec import SPECS, notifies
from mxrules.config import WorkerSettings
from mxrules.errors import SpoolError
from mxrules.jobstate import NO_ACTION, Failure, Next, Phase, Transition
from mxrules.metrics import WorkerMetrics
from mxrules.rules import Action, LambdaAction
from mxrules.service import kv
from mxrules.spool import DEFERRED, DONE, FAILED, Claim, Job, message_time
from mxrules.verdicts import DMARC, SPF

from . import sns
from .aws import Clients, classify
from .base import ActionContext, Outcome, PermanentActionError
from .bounce_limit import BounceLimiter
from .retry import RetryPolicy

log = logging.getLogger("mxrules.worker")

# Each action type's `run`, from the module its spec names (the core never imports actions/).
ACTIONS: dict[str, Callable[[ActionContext], Outcome]] = {
    key: importlib.import_module(f"{__package__}.{spec.module}").run
    for key, spec in SPECS.items()
}
# What a failure's transition leaves the job in, as run() returns it.
_LEFT_IN = {Next.RETRY: DEFERRED, Next.DEAD_LETTER_NOW: FAILED}


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
        """Work a job until it is done, deferred or dead; returns the state it is left in."""
        job = claim.job
        while True:
            job, next_step = jobstate.settle(job)
            if next_step is Next.FINISH:
                return self._finish(claim, job)
            if next_step is Next.DEAD_LETTER:
                return self._dead_letter(claim, job)
            if self.stopping.is_set():
                # Draining: hand the job back, due now, for the next worker to go on.
                claim.move(DEFERRED)
                return DEFERRED
            job, next_step = self._step(claim, job)
            if next_step in _LEFT_IN:
                return _LEFT_IN[next_step]

    def _step(self, claim: Claim, job: Job) -> tuple[Job, Next]:
        """Run the job's step (an action or its notification) and record what follows."""
        p = job.progress
        matched = job.rules[p.rule]
        action = matched.rule.actions[p.action]
        ctx = ActionContext(job=job, matched=matched, action=action, rule_index=p.rule,
                            action_index=p.action, message_path=claim.message_path,
                            added_headers=p.added_headers, clients=self.clients,
                            settings=self.settings, bounce_limiter=self.bounce_limiter)
        started = time.monotonic()
        try:
            if p.phase == Phase.ACTION:
                outcome = ACTIONS[action.KEY](ctx)
                after = jobstate.ran(
                    job, disposition=outcome.disposition, header=outcome.header,
                    notify=notifies(action) and not outcome.bounced,
                    done=f"rule {matched.rule.name} action {p.action + 1} "
                         f"{action.TYPE}: {outcome.detail}")
                self._action_ok(job, action, outcome, _ms(started))
            else:
                if not action.topic_arn:  # a NOTIFY phase is entered only with one
                    raise PermanentActionError(f"{action.TYPE} has no topic_arn to notify")
                note = sns.notify(ctx, action.topic_arn)
                after = jobstate.notified(job)
                self._notified(job, action, note, _ms(started))
            self._record(claim, after)
            return after, Next.RUN
        except SpoolError:
            raise  # the spool itself failed: the job stays in active/ for recovery
        except Exception as exc:
            return self._failed(claim, job, action.TYPE, exc)
        finally:
            self.metrics.action_seconds.labels(action.TYPE).observe(time.monotonic() - started)

    def _finish(self, claim: Claim, job: Job) -> str:
        try:
            claim.finish(job)
        except OSError:
            if claim.fd >= 0:  # neither moved nor saved: hold it until saved
                self._save(claim, job)
            raise
        self.metrics.jobs.labels("done").inc()
        latency = max(0.0, self.clock() - message_time(job.message_id))
        self.metrics.job_seconds.observe(latency)
        log.info("job done %s", kv(message_id=job.message_id, queue_id=job.queue_id,
                                   actions=len(job.progress.done),
                                   stopped="rule-set" if job.progress.stopped else None,
                                   ms=int(latency * 1000)))
        return DONE

    # -- metrics and logging, once per step, from what it did ------------------------
    def _action_ok(self, job: Job, action: Action, outcome: Outcome, ms: int) -> None:
        p = job.progress
        self.metrics.actions.labels(action.TYPE, "bounced" if outcome.bounced else "ok").inc()
        if p.attempts and self.recovered:
            self.recovered(action.TYPE)
        if isinstance(action, LambdaAction):  # mxrules_lambda_dispositions_total
            self.metrics.dispositions.labels(outcome.disposition).inc()
        rule = job.rules[p.rule].rule.name
        if outcome.suppressed:
            self._suppressed(job, rule, p.action + 1, outcome)
        log.info("action ok %s", kv(
            message_id=job.message_id, queue_id=job.queue_id, rule=rule, action=p.action + 1,
            type=action.TYPE, detail=outcome.detail, ms=ms))

    def _notified(self, job: Job, action: Action, note: str, ms: int) -> None:
        p = job.progress
        self.metrics.notifications.labels(action.TYPE).inc()
        if p.attempts and self.recovered:
            self.recovered("SNS")
        log.info("action notified %s", kv(
            message_id=job.message_id, queue_id=job.queue_id,
            rule=job.rules[p.rule].rule.name, action=p.action + 1, type=action.TYPE,
            detail=note, ms=ms))

    def _suppressed(self, job: Job, rule: str, action: int, outcome: Outcome) -> None:
        """A Bounce that sent nothing on purpose: done, not failed, and never silent."""
        self.metrics.bounces_suppressed.labels(outcome.suppressed).inc()
        log.info("bounce suppressed %s", kv(
            message_id=job.message_id, queue_id=job.queue_id, rule=rule, action=action,
            reason=outcome.suppressed, sender=job.mail_from, client=job.client.address,
            spf=job.verdicts.get(SPF), dmarc=job.verdicts.get(DMARC)))

    def _record(self, claim: Claim, job: Job) -> None:
        """Make the progress after an action durable before anything else is done.

        While actions are left, that is a save (write, fsync, rename, fsync dir).  Once
        none is, the next step is Claim.finish: its rename out of active/ and fsync of
        active/ record "done" durably by themselves, so the save -- a job.json written
        and fsync'd only to be deleted -- is skipped (finish saves the job after all if
        it cannot move it).  Either way a crash repeats at most the action in flight.
        """
        if not jobstate.complete(job):
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
        kind = jobstate.current_type(job)  # NO_ACTION past its last: it failed finishing
        return _LEFT_IN[self._failed(claim, job, kind, exc, go_on=False)[1]]

    def _failed(self, claim: Claim, job: Job, kind: str, exc: Exception, *,
                go_on: bool = True) -> tuple[Job, Next]:
        """Record a failure of the job's step: deferred for a retry, given up on, or dead.

        Not `go_on` (an error outside the actions, a bug): given up, the whole job
        is dead-lettered where it stands.
        """
        failure = Failure.of(kind, job.progress.phase, classify(exc), str(exc))
        t = jobstate.failed(job, failure, now=self.clock(), policy=self.policy, rand=self.rand,
                            permanent=isinstance(exc, PermanentActionError), go_on=go_on)
        if kind != NO_ACTION:
            self.metrics.action_errors.labels(kind, failure.reason).inc()
        if t.next is Next.GIVEN_UP:
            self._record(claim, t.job)
        else:
            self._save(claim, t.job)
            claim.move(_LEFT_IN[t.next])
        self._report_failure(job, failure, t)
        return t.job, t.next

    def _report_failure(self, job: Job, failure: Failure, t: Transition) -> None:
        p = job.progress
        kind = failure.type
        facts = {"message_id": job.message_id, "queue_id": job.queue_id,
                 "rule": job.rules[p.rule].rule.name if p.rule < len(job.rules) else "-",
                 "action": p.action + 1, "type": kind, "reason": failure.reason,
                 "attempts": t.attempts}
        if t.next is Next.RETRY:
            if kind != NO_ACTION:
                self.metrics.actions.labels(kind, "retry").inc()
            log.warning("action failed, will retry %s", kv(
                **facts, retry_in=f"{t.delay:.1f}s", error=failure.text))
            return
        if kind != NO_ACTION:
            self.metrics.actions.labels(kind, "failed").inc()
        if t.next is Next.GIVEN_UP:
            log.error("action failed for good %s (the plan goes on without it)",
                      kv(**facts, error=failure.text))
            return
        self._dead_lettered()
        log.error("job dead-lettered %s (mxrules spool requeue %s)",
                  kv(**facts, error=failure.text), job.message_id)

    def _dead_lettered(self) -> None:
        self.metrics.jobs.labels("dead_lettered").inc()
        self.metrics.dead_letters.inc()
        if self.dead_lettered:
            self.dead_lettered()

    def _dead_letter(self, claim: Claim, job: Job) -> str:
        """Every action has run or failed for good: the job waits in failed/ for an operator."""
        p = job.progress
        failed = [f"{job.rules[r].rule.name}#{a + 1}" + (" notification" if ph == "notify" else "")
                  for r, a, ph in p.failed]
        self._save(claim, job)
        claim.move(FAILED)
        log.error("job dead-lettered %s (mxrules spool requeue %s runs the failed actions "
                  "again)", kv(message_id=job.message_id, queue_id=job.queue_id,
                              failed=",".join(failed), error=p.last_error), job.message_id)
        self._dead_lettered()
        return FAILED


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
