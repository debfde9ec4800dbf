"""S3: PutObject of the stored copy at `object_key_prefix/messageId` (the prefix is a folder).

The body streams from the spool (SES's prepended headers, the AddHeaders run
so far, then the raw message), so a 40 MB message costs no more memory than a
small one.  With kms_key_arn the object is encrypted server-side with that key
(`aws:kms`), which every S3 client reads back without extra steps.
"""

from __future__ import annotations

from mxrules import payload
from mxrules.rules import S3Action

from .base import ActionContext, Outcome, PermanentActionError

MAX_OBJECT = 40 * 1024 * 1024  # SES's limit for the S3 action


def run(ctx: ActionContext) -> Outcome:
    action = ctx.action
    assert isinstance(action, S3Action)
    body = payload.StoredCopy(ctx.job, ctx.message_path, ctx.added_headers)
    try:
        if body.size > MAX_OBJECT:
            raise PermanentActionError(
                f"message of {body.size} bytes is over the S3 action's limit of {MAX_OBJECT}")
        key = payload.object_key(ctx.job, action)
        extra = {}
        if action.kms_key_arn:
            extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": action.kms_key_arn}
        ctx.clients.s3.put_object(Bucket=action.bucket_name, Key=key, Body=body,
                                  ContentLength=body.size, **extra)
    finally:
        body.close()
    return Outcome(detail=f"stored s3://{action.bucket_name}/{key} ({body.size} bytes)")
