"""SNS: publish SES's notification with the stored copy as `content`.

SES delivers only messages up to 150 KB through SNS; the limit is checked
here, in bytes of the whole published message (moto does not enforce it).
"""

from __future__ import annotations

from mxrules import payload
from mxrules.rules import SNSAction

from .base import ActionContext, Outcome, PermanentActionError, processing_ms, stored_headers

MAX_MESSAGE = 150 * 1024


def run(ctx: ActionContext) -> Outcome:
    action = ctx.action
    assert isinstance(action, SNSAction)
    with payload.StoredCopy(ctx.job, ctx.message_path, ctx.added_headers) as copy:
        if copy.size > MAX_MESSAGE:
            raise PermanentActionError(
                f"message of {copy.size} bytes is over the SNS action's limit of {MAX_MESSAGE}")
        content = copy.read_all()
    headers, truncated = stored_headers(ctx)
    message = payload.notification_json(
        ctx.job, ctx.matched, action, headers=headers, truncated=truncated,
        processing_ms=processing_ms(ctx.job), content=content, encoding=action.encoding)
    size = len(message.encode("utf-8"))
    if size > MAX_MESSAGE:
        raise PermanentActionError(
            f"notification of {size} bytes is over the SNS action's limit of {MAX_MESSAGE}")
    assert action.topic_arn
    reply = ctx.clients.sns.publish(TopicArn=action.topic_arn, Message=message,
                                    Subject=payload.SUBJECT)
    return Outcome(detail=f"published to {action.topic_arn} ({size} bytes, "
                          f"MessageId {reply.get('MessageId', '?')})")


def notify(ctx: ActionContext, topic_arn: str) -> str:
    """Any action's `topic_arn`: publish the notification for that action (no content)."""
    headers, truncated = stored_headers(ctx)
    message = payload.notification_json(
        ctx.job, ctx.matched, ctx.action, headers=headers, truncated=truncated,
        processing_ms=processing_ms(ctx.job))
    size = len(message.encode("utf-8"))
    if size > MAX_MESSAGE:
        raise PermanentActionError(
            f"notification of {size} bytes is over SNS's limit of {MAX_MESSAGE}")
    ctx.clients.sns.publish(TopicArn=topic_arn, Message=message, Subject=payload.SUBJECT)
    return f"notified {topic_arn}"
