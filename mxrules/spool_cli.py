"""`mxrules spool ...`: what an operator sees of, and does to, the spool."""

from __future__ import annotations

import json
import os
import pwd
import time
from typing import Any

from .errors import CorruptJobError, SpoolError
from .jobstate import Next, Phase, settle
from .spool import DEFERRED, FAILED, STATES, Job, Spool, message_time
from .terminal import printable


def become_owner(root: str) -> None:
    """Run as the spool's owner (the mxrules user) when started as root.

    Root acting in the spool directly would follow what that user planted there
    (a link where a file is written next) and would leave files behind that the
    worker, which runs as that user, cannot open (a job's lock: the job would
    never run again).  As the owner, a command can do nothing the owner could not.
    """
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return  # no spool: nothing will be touched
    except OSError as exc:
        raise SpoolError(f"cannot use the spool {root}: {exc.strerror}") from None
    if st.st_uid == 0:
        return  # root's own spool
    try:
        user = pwd.getpwuid(st.st_uid)
    except KeyError:
        user = None
    try:
        if user is None:
            os.setgroups([])
            os.setgid(st.st_gid)
        else:
            os.initgroups(user.pw_name, user.pw_gid)
            os.setgid(user.pw_gid)
        os.setuid(st.st_uid)
    except OSError as exc:
        raise SpoolError(f"cannot switch to the owner of {root} (uid {st.st_uid}): "
                         f"{exc.strerror}; run the command as that user") from None


def _age(seconds: float) -> str:
    """`95` -> `1m35s`; `7300` -> `2h1m`; two units at most, for a narrow column."""
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


def _next_action(job: Job) -> str:
    """The step the worker runs next (as jobstate.settle finds it), or `-`: none is left."""
    job, next_step = settle(job)
    if next_step is not Next.RUN:
        return "-"
    p = job.progress
    rule = job.rules[p.rule].rule
    kind = rule.actions[p.action].TYPE
    return f"{rule.name} #{p.action + 1} {kind}" + (" (notify)" if p.phase == Phase.NOTIFY
                                                     else "")


def failed_actions(job: Job) -> list[str]:
    """The actions given up on, as `rule #N TYPE` (`... (notify)` for a notification)."""
    out = []
    for rule, action, phase in job.progress.failed:
        try:
            matched = job.rules[rule].rule
            kind = matched.actions[action].TYPE
        except IndexError:
            out.append(f"rule {rule + 1} #{action + 1}")
            continue
        out.append(f"{matched.name} #{action + 1} {kind}" + (" (notify)" if phase == "notify"
                                                             else ""))
    return out


def row(state: str, job_id: str, job: Job | CorruptJobError, now: float) -> dict[str, Any]:
    base: dict[str, Any] = {"id": job_id, "state": state,
                            "age_seconds": round(now - message_time(job_id), 1)}
    if isinstance(job, CorruptJobError):
        return {**base, "error": job.cause}
    p = job.progress
    return {**base, "queue_id": job.queue_id, "from": job.mail_from,
            "recipients": list(job.recipients), "attempts": p.attempts,
            "next_action": _next_action(job),
            "next_due_in": round(max(0.0, p.next_due - now), 1) if state == DEFERRED else None,
            "last_error": p.last_error, "failed": failed_actions(job)}


def list_jobs(spool: Spool, states: list[str], as_json: bool) -> str:
    now = time.time()
    rows = [row(state, job_id, job, now) for state in states for job_id, job in spool.jobs(state)]
    if as_json:
        return json.dumps(rows, indent=2)
    if not rows:
        return f"no jobs ({', '.join(states)})"
    lines = [f"{'ID':40}  {'AGE':>6}  {'STATE':8}  {'TRY':>3}  {'NEXT ACTION':28}  LAST ERROR"]
    for r in rows:
        error = printable((r.get("last_error") or r.get("error") or "").replace("\n", " "))
        action = printable(str(r.get("next_action", "-")))
        lines.append(f"{r['id']:40}  {_age(r['age_seconds']):>6}  {r['state']:8}  "
                     f"{r.get('attempts', '-')!s:>3}  {action[:28]:28}  {error[:80]}")
    counts = ", ".join(f"{s}: {sum(1 for r in rows if r['state'] == s)}" for s in states)
    lines.append(f"{len(rows)} job(s) ({counts})")
    return "\n".join(lines)


def show_job(spool: Spool, job_id: str, as_json: bool) -> str:
    state = spool.find(job_id)
    if state is None:
        raise SpoolError(f"no job {job_id} in the spool")
    try:
        job = spool.load(state, job_id)
    except CorruptJobError as exc:
        return json.dumps({"id": job_id, "state": state, "error": exc.cause}, indent=2) \
            if as_json else f"{job_id} ({state}): cannot be decoded: {printable(exc.cause)}"
    from .job import to_json
    data = {"id": job_id, "state": state, "message_path": spool.message_path(state, job_id),
            **to_json(job)}
    if as_json:
        return json.dumps(data, indent=2)
    p = job.progress
    f = printable  # every value from the job: most of it came with the mail
    c = job.client
    out = [f"job {job_id} ({state})",
           f"  received   {f(job.received_at)} (Postfix queue id {f(job.queue_id) or '-'})",
           f"  client     [{f(c.address)}] {f(c.hostname)} helo={f(c.helo)}"
           f" tls={f(c.tls_version) or 'no'}",
           f"  from       <{f(job.mail_from)}>",
           f"  rule set   {f(job.rule_set)}",
           f"  size       {job.message_size} bytes, sha256 {f(job.message_sha256)}",
           f"  message    {f(spool.message_path(state, job_id))}"]
    for i, m in enumerate(job.rules):
        marker = ">" if i == p.rule and not p.stopped else " "
        out.append(f" {marker}rule {f(m.rule.name)}: {f(', '.join(m.recipients))}")
        for j, a in enumerate(m.rule.actions):
            here = "  <- next" if i == p.rule and j == p.action and not p.stopped else ""
            out.append(f"      {j + 1}. {a.TYPE}{here}")
    wait = f", next try in {max(0.0, p.next_due - time.time()):.0f}s" \
        if state == DEFERRED else ""
    out.append(f"  attempts   {p.attempts}{wait}")
    if p.failed:
        out.append(f"  failed     {', '.join(failed_actions(job))} (the other actions ran)")
    if p.last_error:
        out.append(f"  last error {f(p.last_error)}")
    if p.done:
        out.append("  done:")
        out += [f"    {f(d)}" for d in p.done]
    return "\n".join(out)


def requeue(spool: Spool, ids: list[str], all_failed: bool) -> list[str]:
    targets = spool.ids(FAILED) if all_failed else ids
    for job_id in targets:
        spool.requeue(job_id)
    return targets


ALL_STATES = list(STATES)
