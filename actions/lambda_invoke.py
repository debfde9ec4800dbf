"""Lambda: invoke a function with SES's event (no body); RequestResponse reads its answer.

A RequestResponse function may answer `{"disposition": "STOP_RULE"}` (no more
actions in this rule), `"STOP_RULE_SET"` (nothing more at all) or `"CONTINUE"`;
anything else, or nothing, means continue -- case-insensitive, as in SES.
A function that fails (FunctionError) is retried like any other failure.
"""

from __future__ import annotations

import json
from typing import Any

from mxrules import payload
from mxrules.actionspec import narrow
from mxrules.errors import MxrulesError
from mxrules.rules import LambdaAction

from .base import (
    ActionContext,
    Disposition,
    Outcome,
    PermanentActionError,
    processing_ms,
    stored_headers,
)

MAX_EVENT = 256 * 1024  # Lambda's limit for asynchronous (Event) payloads
MAX_SYNC_EVENT = 6 * 1024 * 1024


class FunctionFailed(MxrulesError):
    """The function ran and failed (or timed out); retried like any other failure."""


def disposition_of(answer: bytes) -> Disposition:
    """SES's reading of a RequestResponse answer: only a known disposition stops.

    The function has run by then, so no answer may make the action fail: a failure
    would be retried, invoking the function again.  Whatever cannot be read (not
    UTF-8, not JSON, nested past the parser's recursion limit...) is CONTINUE.
    """
    try:
        data: Any = json.loads(answer.decode("utf-8")) if answer.strip() else None
        value = data.get("disposition") if isinstance(data, dict) else None
        if isinstance(value, str) and value.upper() in ("STOP_RULE", "STOP_RULE_SET"):
            return "STOP_RULE" if value.upper() == "STOP_RULE" else "STOP_RULE_SET"
    except Exception:  # RecursionError too: no answer is an error
        pass
    return "CONTINUE"


def _read_answer(reply: dict[str, Any]) -> bytes:
    """The reply's payload; one that cannot be read after the call is an empty answer.

    The invocation succeeded (or FunctionError says it did not): a failure while
    reading the body must not turn into a retry that invokes the function again.
    """
    try:
        return reply["Payload"].read() if reply.get("Payload") is not None else b""
    except Exception:
        return b""


def run(ctx: ActionContext) -> Outcome:
    action = narrow(ctx.action, LambdaAction)
    headers, truncated = stored_headers(ctx)
    limit = MAX_SYNC_EVENT if action.invocation_type == "RequestResponse" else MAX_EVENT
    try:
        event = payload.lambda_event_json(
            ctx.job, ctx.matched, action, headers=headers, truncated=truncated,
            processing_ms=processing_ms(ctx.job), limit=limit).encode("utf-8")
    except payload.PayloadTooLarge as exc:
        raise PermanentActionError(f"Lambda event of {exc} ({action.invocation_type})"
                                   ) from exc
    reply = ctx.clients.lambda_.invoke(FunctionName=action.function_arn,
                                       InvocationType=action.invocation_type, Payload=event)
    answer = _read_answer(reply)
    if reply.get("FunctionError"):
        raise FunctionFailed(f"{action.function_arn} failed ({reply['FunctionError']}): "
                             f"{answer[:300]!r}")
    if action.invocation_type != "RequestResponse":
        return Outcome(detail=f"invoked {action.function_arn} (Event)")
    disposition = disposition_of(answer)
    return Outcome(disposition=disposition,
                   detail=f"invoked {action.function_arn}: disposition {disposition}")
