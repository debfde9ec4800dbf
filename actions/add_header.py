"""AddHeader: the header joins every stored copy made by later actions of the job.

Postfix's own copy already got the in-stream AddHeaders at end of data; this
records the header for the stored copies (S3 object, SNS content, mail.headers).
"""

from __future__ import annotations

from mxrules.actionspec import narrow
from mxrules.rules import AddHeaderAction

from .base import ActionContext, Outcome


def run(ctx: ActionContext) -> Outcome:
    action = narrow(ctx.action, AddHeaderAction)
    header = (action.header_name, action.header_value)
    return Outcome(detail=f"added {action.header_name}", header=header)
