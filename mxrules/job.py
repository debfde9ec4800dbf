"""The job record: what the milter hands the worker, and its encoding in job.json.

A job is a frozen record -- the envelope, client facts, verdicts, the matched
rules and their recipients, the headers added in-stream, and the worker's
progress -- with one encoding: JSON under a SHA-256 of its canonical form.
Decoding checks the checksum, then the type and range of every field, so a
job.json damaged or written by hand is refused here (the spool moves it to
corrupt/), never found wrong later in the middle of a job.  The spool
(mxrules.spool) stores and moves jobs; this module never touches a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from .errors import CorruptJobError
from .jobstate import Disposition, Failure, Phase, Stopped
from .rules import ACTION_TYPES, Rule

JOB_VERSION = 1
_Member = TypeVar("_Member", bound=StrEnum)

def ses_timestamp(when: datetime | None = None) -> str:
    """SES's timestamp form: `2026-01-01T00:00:00.000Z`."""
    when = when or datetime.now(UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Client:
    address: str
    hostname: str = ""  # Postfix's reverse name, or "unknown"
    helo: str = ""
    tls_version: str = ""  # empty: not over TLS
    tls_cipher: str = ""
    forwarded_by: str = ""  # the trusted forwarder the mail came through, if any


@dataclass(frozen=True)
class MatchedRule:
    rule: Rule
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class Progress:
    """Where the worker is; persisted after each action so a crash re-runs one."""

    rule: int = 0  # index into Job.rules
    action: int = 0  # index into that rule's actions
    attempts: int = 0  # attempts of the current action
    first_attempt_at: float | None = None
    next_due: float = 0.0
    last_error: str = ""  # the last failure's text, for operators (Failure.text)
    stopped: Stopped = Stopped.NO
    done: tuple[str, ...] = ()  # one line per finished action, for operators
    # AddHeader actions that ran, in order: later stored copies include them.
    added_headers: tuple[tuple[str, str], ...] = ()
    # ACTION: the action at (rule, action) is next; NOTIFY: it ran, and only
    # its topic_arn notification is left (so a failed publish never re-runs it).
    phase: Phase = Phase.ACTION
    disposition: Disposition = Disposition.NONE  # in the NOTIFY phase: the action's answer
    # (rule, action, phase) of the actions given up on; the plan went on without them,
    # and the job ends in failed/.
    failed: tuple[tuple[int, int, Phase], ...] = ()
    # A requeued dead letter runs only these (and its AddHeaders); empty: every action.
    only: tuple[tuple[int, int, Phase], ...] = ()
    # The last failure of the current step (its waits_on tells which recovery wakes it).
    failure: Failure | None = None


@dataclass(frozen=True)
class Job:
    message_id: str
    queue_id: str
    received_at: str  # SES timestamp
    rule_set: str
    mail_from: str  # envelope sender without <>; "" for the null sender
    recipients: tuple[str, ...]  # every handled envelope recipient
    client: Client
    rules: tuple[MatchedRule, ...]
    in_stream_headers: tuple[tuple[str, str], ...]  # what the milter added to Postfix's copy
    hostname: str  # this MX's name at accept time
    message_size: int
    message_sha256: str
    verdicts: dict[str, str] = field(default_factory=dict)
    # Received-SPF and Authentication-Results from the scans, for stored copies.
    auth_headers: tuple[tuple[str, str], ...] = ()
    progress: Progress = field(default_factory=Progress)
    version: int = JOB_VERSION

    def encode(self) -> bytes:
        body = to_json(self)
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        check = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return json.dumps({"job": body, "sha256": check}, ensure_ascii=False,
                          sort_keys=True, indent=1).encode("utf-8") + b"\n"

    @classmethod
    def decode(cls, raw: bytes, job_id: str = "?") -> Job:
        try:
            outer = json.loads(raw.decode("utf-8"))
            body = outer["job"]
            text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != outer["sha256"]:
                raise CorruptJobError(job_id, "checksum mismatch")
            if body.get("version") != JOB_VERSION:
                raise CorruptJobError(job_id, f"unknown job version {body.get('version')!r}")
            return _from_json(body)
        except CorruptJobError:
            raise
        except _Shape as exc:
            raise CorruptJobError(job_id, f"cannot decode job.json: {exc}") from None
        # RecursionError: `[[[[...` exceeds the JSON parser's recursion limit.
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CorruptJobError(job_id, f"cannot decode job.json: {exc!r}") from None


def to_json(job: Job) -> dict[str, Any]:
    out = asdict(job)
    out["rules"] = [{"rule": m.rule.to_config(), "recipients": list(m.recipients)}
                    for m in job.rules]
    out["in_stream_headers"] = [list(h) for h in job.in_stream_headers]
    out["auth_headers"] = [list(h) for h in job.auth_headers]
    return out


class _Shape(ValueError):
    """A job.json field of the wrong type or out of range, under a checksum that matches.

    The checksum only says the file is as some writer left it; the worker then
    indexes, compares and does arithmetic with these values, so each is checked
    here, where a bad one sends the job to corrupt/ with its cause, and never
    later, where it would fail outside any per-action handling.
    """


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Shape(f"{where}: expected an object, not {_brief(value)}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Shape(f"{where}: expected a string, not {_brief(value)}")
    return value


def _texts(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Shape(f"{where}: expected a list, not {_brief(value)}")
    return tuple(_text(v, f"{where}[{i}]") for i, v in enumerate(value))


def _pairs(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """A list of [name, value] string pairs (header fields)."""
    if not isinstance(value, list):
        raise _Shape(f"{where}: expected a list, not {_brief(value)}")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _Shape(f"{where}[{i}]: expected a [name, value] pair, not {_brief(pair)}")
        name, text = _texts(pair, f"{where}[{i}]")
        pairs.append((name, text))
    return tuple(pairs)


def _count(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
        raise _Shape(f"{where}: expected an integer >= 0, not {_brief(value)}")
    return value


def _time(value: Any, where: str) -> float:
    # NaN would never compare as due: the job would wait in deferred/ forever.
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return value
    if not isinstance(value, float) or not math.isfinite(value):
        raise _Shape(f"{where}: expected a finite number, not {_brief(value)}")
    return value


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _Shape(f"{where}: expected one of {', '.join(map(repr, choices))}, "
                     f"not {_brief(value)}")
    return value


def _member(value: Any, where: str, kind: type[_Member]) -> _Member:
    return kind(_choice(value, where, tuple(member.value for member in kind)))


# Field annotations whose values can be checked here, and how a mismatch is named.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"), "bool": ((bool,), "true or false"),
    "int": ((int,), "an integer"), "float": ((int, float), "a number")}


def _check_fields(cls: type, values: dict[str, Any], where: str) -> None:
    """Each of `values` is a field of dataclass `cls` holding a value of its annotation.

    Read from the annotations, so a field added to `cls` later is checked too; one
    of a type not in _KINDS is left to the constructor.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in fields:
            raise _Shape(f"{where}: unknown field {_brief(name)}")
        annotation = str(fields[name].type)
        optional = annotation.endswith(" | None")
        kind = _KINDS.get(annotation.removesuffix(" | None"))
        if kind is None or (value is None and optional):
            continue
        kinds, named = kind
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise _Shape(f"{where}.{name}: expected {named}, not {_brief(value)}")


def _check_action(item: Any, where: str) -> None:
    """An action as Rule.from_config reads it: `{key: {field: value}}`."""
    item = _object(item, where)
    if len(item) != 1 or next(iter(item)) not in ACTION_TYPES:
        raise _Shape(f"{where}: expected one of the action keys, not {_brief(list(item))}")
    ((key, body),) = item.items()
    _check_fields(ACTION_TYPES[key], _object(body or {}, f"{where}.{key}"), f"{where}.{key}")


def _rule(raw: Any, where: str) -> Rule:
    rule = _object(raw, where)
    _text(rule.get("name"), f"{where}.name")
    _texts(rule.get("recipients") or [], f"{where}.recipients")
    _choice(rule.get("tls_policy", Rule.tls_policy), f"{where}.tls_policy", ("Require", "Optional"))
    actions = rule.get("actions") or []
    if not isinstance(actions, list):
        raise _Shape(f"{where}.actions: expected a list, not {_brief(actions)}")
    for i, action in enumerate(actions):
        _check_action(action, f"{where}.actions[{i}]")
    return Rule.from_config(rule)


def _matched(raw: Any, where: str) -> MatchedRule:
    m = _object(raw, where)
    return MatchedRule(_rule(m.get("rule"), f"{where}.rule"),
                       _texts(m.get("recipients"), f"{where}.recipients"))


def _steps(value: Any, where: str) -> tuple[tuple[int, int, Phase], ...]:
    """A list of [rule, action, phase] steps (actions given up on, or to run again)."""
    if not isinstance(value, list):
        raise _Shape(f"{where}: expected a list, not {_brief(value)}")
    steps = []
    for i, step in enumerate(value):
        if not (isinstance(step, list) and len(step) == 3):
            raise _Shape(f"{where}[{i}]: expected a [rule, action, phase] step, "
                         f"not {_brief(step)}")
        steps.append((_count(step[0], f"{where}[{i}][0]"), _count(step[1], f"{where}[{i}][1]"),
                      _member(step[2], f"{where}[{i}][2]", Phase)))
    return tuple(steps)


def _failure(raw: Any, where: str) -> Failure | None:
    if raw is None:
        return None
    f = _object(raw, where)
    transient = f.get("transient")
    if not isinstance(transient, bool):
        raise _Shape(f"{where}.transient: expected true or false, not {_brief(transient)}")
    _check_fields(Failure, f, where)
    return Failure(type=_text(f.get("type"), f"{where}.type"),
                   phase=_member(f.get("phase"), f"{where}.phase", Phase),
                   reason=_text(f.get("reason"), f"{where}.reason"), transient=transient,
                   detail=_text(f.get("detail"), f"{where}.detail"))


def _progress(raw: Any, rules: tuple[MatchedRule, ...]) -> Progress:
    p = _object({} if raw is None else raw, "progress")
    first = p.get("first_attempt_at")
    checked: dict[str, Any] = dict(
        rule=_count(p.get("rule", 0), "progress.rule"),
        action=_count(p.get("action", 0), "progress.action"),
        attempts=_count(p.get("attempts", 0), "progress.attempts"),
        first_attempt_at=None if first is None else _time(first, "progress.first_attempt_at"),
        next_due=_time(p.get("next_due", 0.0), "progress.next_due"),
        last_error=_text(p.get("last_error", ""), "progress.last_error"),
        stopped=_member(p.get("stopped", ""), "progress.stopped", Stopped),
        done=_texts(p.get("done", []), "progress.done"),
        added_headers=_pairs(p.get("added_headers", []), "progress.added_headers"),
        phase=_member(p.get("phase", "action"), "progress.phase", Phase),
        disposition=_member(p.get("disposition", ""), "progress.disposition", Disposition),
        failed=_steps(p.get("failed", []), "progress.failed"),
        only=_steps(p.get("only", []), "progress.only"),
    )
    checked["failure"] = _failure(p["failure"], "progress.failure") if "failure" in p \
        else Failure.from_text(checked["last_error"])  # saved before failures were records
    rest = {k: v for k, v in p.items() if k not in checked}
    _check_fields(Progress, rest, "progress")
    progress = Progress(**rest, **checked)
    if progress.phase == Phase.NOTIFY and not progress.stopped:
        # Only an action with a topic_arn has a notification left to send.
        actions = rules[progress.rule].rule.actions if progress.rule < len(rules) else ()
        if progress.action >= len(actions) or not actions[progress.action].topic_arn:
            raise _Shape("progress.phase: 'notify' for an action without a topic_arn")
    return progress


def _from_json(body: dict[str, Any]) -> Job:
    body = _object(body, "job")
    client = _object(body.get("client"), "client")
    _check_fields(Client, client, "client")
    verdicts = _object(body.get("verdicts", {}), "verdicts")
    for name, value in verdicts.items():
        _text(value, f"verdicts.{name}")
    raw_rules = body.get("rules")
    if not isinstance(raw_rules, list):
        raise _Shape(f"rules: expected a list, not {_brief(raw_rules)}")
    rules = tuple(_matched(m, f"rules[{i}]") for i, m in enumerate(raw_rules))
    return Job(
        message_id=_text(body.get("message_id"), "message_id"),
        queue_id=_text(body.get("queue_id"), "queue_id"),
        received_at=_text(body.get("received_at"), "received_at"),
        rule_set=_text(body.get("rule_set"), "rule_set"),
        mail_from=_text(body.get("mail_from"), "mail_from"),
        recipients=_texts(body.get("recipients"), "recipients"),
        client=Client(**client),
        rules=rules,
        in_stream_headers=_pairs(body.get("in_stream_headers"), "in_stream_headers"),
        hostname=_text(body.get("hostname"), "hostname"),
        message_size=_count(body.get("message_size"), "message_size"),
        message_sha256=_text(body.get("message_sha256"), "message_sha256"),
        verdicts=dict(verdicts),
        auth_headers=_pairs(body.get("auth_headers", []), "auth_headers"),
        progress=_progress(body.get("progress"), rules),
        version=body["version"],
    )


def with_progress(job: Job, **changes: Any) -> Job:
    return replace(job, progress=replace(job.progress, **changes))
