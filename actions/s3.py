"""S3: PutObject of the stored copy at `object_key_prefix/messageId` (the prefix is a folder).

The body streams from the spool (SES's prepended headers, the AddHeaders run
so far, then the raw message), so a 40 MB message costs no more memory than a
small one.  With kms_key_arn the object is encrypted server-side with that key
(`aws:kms`), which every S3 client reads back without extra steps.
"""

from __future__ import annotations

from mxrules import payload
from mxrules.actionspec import narrow
from mxrules.rules import S3_EMAIL_LIMIT, S3Action

from . import bounce
from .base import ActionContext, Outcome

# SES's limit for the S3 action, SES's headers included.  The milter refuses a
# message over it during SMTP when every recipient's rules would bounce it; here
# it bounces (a DSN), as in SES.
MAX_OBJECT = S3_EMAIL_LIMIT


def run(ctx: ActionContext) -> Outcome:
    action = narrow(ctx.action, S3Action)
    body = payload.StoredCopy(ctx.job, ctx.message_path, ctx.added_headers)
    try:
        if body.size > MAX_OBJECT:
            return bounce.too_big(ctx, body.size, MAX_OBJECT)
        key = payload.object_key(ctx.job, action)
        extra = {}
        if action.kms_key_arn:
            extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": action.kms_key_arn}
        ctx.clients.s3.put_object(Bucket=action.bucket_name, Key=key, Body=body,
                                  ContentLength=body.size, **extra)
    finally:
        body.close()
    return Outcome(detail=f"stored s3://{action.bucket_name}/{key} ({body.size} bytes)")
