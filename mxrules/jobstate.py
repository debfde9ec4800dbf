"""The worker's job state machine: every transition of a job's progress, as data, no I/O.

A job's progress points at one step of its plan: (rule, action, phase).  The
worker asks `settle` what is next -- run that step, finish the job, or
dead-letter it -- and, once the step has run or failed, asks `ran`, `notified`
or `failed` for the progress after it.  What an action's disposition does
(SES: CONTINUE goes on, STOP_RULE ends the rule, STOP_RULE_SET and a Stop
action end the job) is the table AFTER; what a failure leads to (a retry, the
action given up on while the plan goes on, or the job dead-lettered where it
stands) is the table ON_FAILURE.  Nothing here reads a clock, a file or a
socket: the runner passes the time and the retry policy's answers, and does
the saving, the moving, the metrics and the logging from what comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from .actionspec import spec_for

if TYPE_CHECKING:
    from .job import Job


class Phase(StrEnum):
    """Which part of the action at (rule, action) is next."""

    ACTION = "action"
    NOTIFY = "notify"  # the action ran; only its topic_arn notification is left


class Stopped(StrEnum):
    NO = ""
    RULE_SET = "rule_set"  # a Stop action or a STOP_RULE_SET ended the job


class Disposition(StrEnum):
    """What an action answered (SES's dispositions); NONE outside the notify phase."""

    NONE = ""
    CONTINUE = "CONTINUE"
    STOP_RULE = "STOP_RULE"
    STOP_RULE_SET = "STOP_RULE_SET"


class Move(Enum):
    NEXT_ACTION = "next action"
    NEXT_RULE = "next rule"
    STOP = "stop"


# Where the plan goes once an action (and its notification, if any) is done.
AFTER: dict[Disposition, Move] = {
    Disposition.NONE: Move.NEXT_ACTION,
    Disposition.CONTINUE: Move.NEXT_ACTION,
    Disposition.STOP_RULE: Move.NEXT_RULE,
    Disposition.STOP_RULE_SET: Move.STOP,
}


class Next(Enum):
    """What the worker does with the job after a transition."""

    RUN = "run"  # a step is due now: run it
    FINISH = "finish"  # no step is left and none failed: the job leaves the spool
    DEAD_LETTER = "dead letter"  # no step is left, some failed: to failed/
    RETRY = "retry"  # the step failed; to deferred/ until next_due
    GIVEN_UP = "given up"  # the step failed for good; the plan goes on without it
    DEAD_LETTER_NOW = "dead letter now"  # a failure outside the actions, given up on


# A failure's outcome by (the retry policy gives up, the plan may go on without it).
# Not going on: an error outside the actions' own handling (a bug) -- the job stops
# where it stands rather than skip a step it may not have run.
ON_FAILURE: dict[tuple[bool, bool], Next] = {
    (False, True): Next.RETRY,
    (False, False): Next.RETRY,
    (True, True): Next.GIVEN_UP,
    (True, False): Next.DEAD_LETTER_NOW,
}

# Failure reasons that say the endpoint was unreachable or unwell, not the job wrong:
# a job waiting on one is retried as soon as an action of that type succeeds again.
TRANSIENT_REASONS = frozenset({"connection", "timeout", "throttled", "server-error"})
NO_ACTION = "-"  # the type recorded for a failure outside any action


@dataclass(frozen=True)
class Failure:
    """The last failure of a job's current step, as the worker recorded it."""

    type: str  # the action's SES type, or NO_ACTION
    phase: Phase
    reason: str  # actions.aws.classify's bounded label
    transient: bool  # the reason is one of TRANSIENT_REASONS
    detail: str  # the error's own words

    @classmethod
    def of(cls, kind: str, phase: Phase, reason: str, detail: str) -> Failure:
        return cls(kind, Phase(phase), reason, reason in TRANSIENT_REASONS, detail[:1000])

    @property
    def text(self) -> str:
        """One line for operators: `TYPE STEP: REASON: detail` (progress.last_error)."""
        step = "notification" if self.phase == Phase.NOTIFY else "action"
        return f"{self.type} {step}: {self.reason}: {self.detail}"[:1000]

    @property
    def waits_on(self) -> str:
        """The action type whose recovery retries this job now ("" if none does).

        A failed topic_arn notification waits on SNS, not on its action.
        """
        if not self.transient:
            return ""
        return "SNS" if self.phase == Phase.NOTIFY else self.type

    @classmethod
    def from_text(cls, text: str) -> Failure | None:
        """The record of a job saved before failures were recorded as one: its last_error."""
        head, _, rest = text.partition(": ")
        reason, _, detail = rest.partition(": ")
        kind, _, step = head.partition(" ")
        if not text or step not in ("action", "notification"):
            return None
        phase = Phase.NOTIFY if step == "notification" else Phase.ACTION
        return cls.of(kind, phase, reason, detail)


class Policy(Protocol):
    """The retry policy's answers (actions.retry.RetryPolicy)."""

    def gives_up(self, first_failure: float, now: float, *, permanent: bool = False) -> bool: ...

    def delay(self, attempts: int, rand: Callable[[], float]) -> float: ...


@dataclass(frozen=True)
class Transition:
    job: Job  # the job as it now stands
    next: Next
    attempts: int = 0  # of the failed step, counting this one
    delay: float = 0.0  # RETRY: seconds until the next try


def _progress(job: Job, **changes: Any) -> Job:
    return replace(job, progress=replace(job.progress, **changes))


# The fields of a step's own attempt, cleared when the plan moves on.
_FRESH: dict[str, Any] = {"attempts": 0, "first_attempt_at": None, "next_due": 0.0,
                          "last_error": "", "failure": None}


def advance(job: Job, disposition: str) -> Job:
    """The progress after the current step is over and the action answered `disposition`."""
    p = job.progress
    move = AFTER[Disposition(disposition)]
    fresh = {**_FRESH, "phase": Phase.ACTION, "disposition": Disposition.NONE}
    if move is Move.STOP:
        return _progress(job, stopped=Stopped.RULE_SET, **fresh)
    if move is Move.NEXT_RULE:
        return _progress(job, rule=p.rule + 1, action=0, **fresh)
    return _progress(job, action=p.action + 1, **fresh)


def wanted(job: Job) -> Phase | None:
    """The phase to run at the job's (rule, action), or None to pass it by.

    Every action runs, except in a requeued dead letter (`progress.only`): there
    only the actions that had failed run, and the AddHeaders (local, and needed
    for the stored copies to be the same as the first time).
    """
    p = job.progress
    if not p.only:
        return Phase(p.phase)
    phases = {phase for rule, action, phase in p.only if (rule, action) == (p.rule, p.action)}
    if Phase.ACTION in phases or (p.phase == Phase.NOTIFY and phases):
        return Phase(p.phase)
    if phases:
        return Phase.NOTIFY  # the action ran the first time; only its notification failed
    # An AddHeader (rerun_on_requeue) runs again, but its notification (if any) was
    # sent the first time.
    actions = job.rules[p.rule].rule.actions
    if spec_for(actions[p.action]).rerun_on_requeue and p.phase == Phase.ACTION:
        return Phase.ACTION
    return None


def settle(job: Job) -> tuple[Job, Next]:
    """The job moved on to its next step to run (RUN), or to its end (FINISH, DEAD_LETTER)."""
    while True:
        p = job.progress
        if p.stopped or p.rule >= len(job.rules):
            return job, Next.DEAD_LETTER if p.failed else Next.FINISH
        if p.action >= len(job.rules[p.rule].rule.actions):
            job = _progress(job, rule=p.rule + 1, action=0)
            continue
        phase = wanted(job)
        if phase is None:
            job = _progress(job, action=p.action + 1, phase=Phase.ACTION,
                            disposition=Disposition.NONE)
            continue
        if phase != p.phase:
            job = _progress(job, phase=phase, disposition=Disposition.CONTINUE)
        return job, Next.RUN


def complete(job: Job) -> bool:
    """No action is left: the rule set was stopped, or every matched rule's actions ran."""
    p = job.progress
    if p.stopped:
        return True
    return all(p.action >= len(m.rule.actions) if i == p.rule else not m.rule.actions
               for i, m in enumerate(job.rules[p.rule:], start=p.rule))


def current_type(job: Job) -> str:
    """The SES type of the action at the job's step, or NO_ACTION past its last one."""
    p = job.progress
    try:
        return job.rules[p.rule].rule.actions[p.action].TYPE
    except IndexError:
        return NO_ACTION


def ran(job: Job, *, disposition: str, notify: bool, header: tuple[str, str] | None,
        done: str) -> Job:
    """The progress after the action at the job's step succeeded.

    `notify`: it has a topic_arn notification to send, a step of its own, so a failed
    publish never runs the action again; its disposition waits in the progress.
    """
    p = job.progress
    job = _progress(job, added_headers=p.added_headers + ((header,) if header else ()),
                    done=(*p.done, done))
    if notify:
        return _progress(job, phase=Phase.NOTIFY, disposition=Disposition(disposition),
                         **{**_FRESH, "next_due": p.next_due})
    return advance(job, disposition)


def notified(job: Job) -> Job:
    """The progress after the notification step succeeded: the action's disposition holds."""
    return advance(job, job.progress.disposition or Disposition.CONTINUE)


def failed(job: Job, failure: Failure, *, now: float, permanent: bool, policy: Policy,
           rand: Callable[[], float], go_on: bool = True) -> Transition:
    """The progress after the job's step failed with `failure` (see ON_FAILURE)."""
    p = job.progress
    first = p.first_attempt_at if p.first_attempt_at is not None else now
    attempts = p.attempts + 1
    where = ON_FAILURE[(policy.gives_up(first, now, permanent=permanent), go_on)]
    if where is Next.RETRY:
        delay = policy.delay(attempts, rand)
        job = _progress(job, attempts=attempts, first_attempt_at=first, next_due=now + delay,
                        last_error=failure.text, failure=failure)
        return Transition(job, where, attempts, delay)
    if where is Next.DEAD_LETTER_NOW:
        job = _progress(job, attempts=attempts, first_attempt_at=first,
                        last_error=failure.text, failure=failure)
        return Transition(job, where, attempts)
    return Transition(_given_up(job, failure, attempts), where, attempts)


def _given_up(job: Job, failure: Failure, attempts: int) -> Job:
    """The step is recorded as failed and the plan goes on past it."""
    p = job.progress
    rule = job.rules[p.rule].rule.name if p.rule < len(job.rules) else NO_ACTION
    done = (*p.done, f"rule {rule} action {p.action + 1} {failure.type}: FAILED after "
                     f"{attempts} attempt{'s' if attempts != 1 else ''}: {failure.text}")
    # A failed notification leaves its action's disposition standing; a failed
    # RequestResponse Lambda gave none, and SES then goes on (CONTINUE).
    disposition = (p.disposition or Disposition.CONTINUE) if p.phase == Phase.NOTIFY \
        else Disposition.CONTINUE
    step = (p.rule, p.action, Phase(p.phase))
    job = advance(job, disposition)
    return _progress(job, done=done, failed=(*p.failed, step), last_error=failure.text,
                     failure=failure)


def requeued(job: Job, *, dead_letter: bool) -> Job:
    """A deferred job or a dead letter given another full retry window, due now.

    A dead letter with failed actions runs only those again (and the AddHeaders,
    which shape the stored copies), from the start of the plan: every other ran.
    """
    job = _progress(job, attempts=0, first_attempt_at=None, next_due=0.0)
    p = job.progress
    if dead_letter and p.failed:
        job = _progress(job, rule=0, action=0, phase=Phase.ACTION,
                        disposition=Disposition.NONE, stopped=Stopped.NO, added_headers=(),
                        only=p.failed, failed=(), last_error="", failure=None)
    return job
