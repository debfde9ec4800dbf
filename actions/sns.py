"""SNS: publish SES's notification with the stored copy as `content`.

SES publishes emails up to 150 KB, SES's own headers included (SNSAction.EMAIL_LIMIT);
a larger one bounces (a DSN to the sender, bounce.too_big), as in SES.  The
notification itself may be larger -- `content` in Base64 is a third larger
than the email -- up to SNS's 256 KB (payload.NOTIFICATION_LIMIT), which the
payload's caps keep it within; moto enforces neither limit.
"""

from __future__ import annotations

from mxrules import payload
from mxrules.actionspec import narrow
from mxrules.rules import SNS_EMAIL_LIMIT, SNSAction

from . import bounce
from .base import ActionContext, Outcome, PermanentActionError, processing_ms, stored_headers


def run(ctx: ActionContext) -> Outcome:
    action = narrow(ctx.action, SNSAction)
    limit = SNS_EMAIL_LIMIT
    with payload.StoredCopy(ctx.job, ctx.message_path, ctx.added_headers) as copy:
        if copy.size > limit:
            return bounce.too_big(ctx, copy.size, limit)
        content = copy.read_all()
    headers, truncated = stored_headers(ctx)
    try:
        message = payload.notification_json(
            ctx.job, ctx.matched, action, headers=headers, truncated=truncated,
            processing_ms=processing_ms(ctx.job), content=content, encoding=action.encoding)
    except payload.PayloadTooLarge as exc:
        # Only an email under 150 KB whose UTF-8 text swells in JSON (bytes that are
        # not UTF-8 become U+FFFD, control characters \uXXXX escapes) gets here: SNS
        # cannot carry it, so it bounces like a larger email.
        return bounce.too_big(ctx, exc.size, exc.limit, notification=True)
    size = len(message.encode("utf-8"))
    if not action.topic_arn:  # the schema requires it; a job file might not
        raise PermanentActionError("SNS action without topic_arn")
    reply = ctx.clients.sns.publish(TopicArn=action.topic_arn, Message=message,
                                    Subject=payload.SUBJECT)
    return Outcome(detail=f"published to {action.topic_arn} ({size} bytes, "
                          f"MessageId {reply.get('MessageId', '?')})")


def notify(ctx: ActionContext, topic_arn: str) -> str:
    """Any action's `topic_arn`: publish the notification for that action (no content)."""
    headers, truncated = stored_headers(ctx)
    try:
        message = payload.notification_json(
            ctx.job, ctx.matched, ctx.action, headers=headers, truncated=truncated,
            processing_ms=processing_ms(ctx.job))
    except payload.PayloadTooLarge as exc:
        raise PermanentActionError(f"notification of {exc}") from exc
    ctx.clients.sns.publish(TopicArn=topic_arn, Message=message, Subject=payload.SUBJECT)
    return f"notified {topic_arn}"
