"""The one small interface every action implements.

An action module exposes `run(ctx: ActionContext) -> Outcome`.  It raises
`PermanentActionError` for a failure no retry can mend (a message over S3's
40 MB limit) and lets anything else propagate: the runner classifies it,
records it on the job and retries with backoff until the retry window ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from mxrules import payload
from mxrules.errors import MxrulesError
from mxrules.rules import Action
from mxrules.spool import Job, MatchedRule

Disposition = Literal["CONTINUE", "STOP_RULE", "STOP_RULE_SET"]


@dataclass(frozen=True)
class ActionContext:
    job: Job
    matched: MatchedRule  # the rule being run and the recipients it matched
    action: Action
    rule_index: int
    action_index: int
    message_path: str  # the raw message as received (read-only)
    # AddHeader actions of this job that ran before this one, in order: the
    # stored copy, `content` and `mail.headers` include them.
    added_headers: tuple[tuple[str, str], ...]
    clients: Any  # per-thread AWS clients (actions.aws.Clients)
    settings: Any  # the worker's settings (actions.runner.WorkerSettings)
    # The worker's DSN counts (actions.bounce_limit.BounceLimiter), shared by its threads.
    bounce_limiter: Any = None


@dataclass(frozen=True)
class Outcome:
    disposition: Disposition = "CONTINUE"
    detail: str = ""  # one line for logs and `mxrules spool show`
    header: tuple[str, str] | None = None  # an AddHeader's header, for later stored copies
    suppressed: str = ""  # a Bounce that sent no DSN: why (metrics.BOUNCE_SUPPRESSIONS)
    # The email was over the action's size limit and bounced instead, as SES does: the
    # action did not store or publish it (nor is its topic_arn notified).
    bounced: bool = False


def processing_ms(job: Job, now: float | None = None) -> int:
    """SES's `processingTimeMillis`: from reception to this action."""
    received = datetime.strptime(job.received_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    when = time.time() if now is None else now
    return max(0, int((when - received.timestamp()) * 1000))


def stored_headers(ctx: ActionContext) -> tuple[list[tuple[str, str]], bool]:
    """The stored copy's headers (for `mail.headers`) and whether reading them was capped."""
    return payload.stored_copy_headers(ctx.job, ctx.message_path, ctx.added_headers)


class PermanentActionError(MxrulesError):
    """A failure no retry can mend; the job is dead-lettered at once."""
