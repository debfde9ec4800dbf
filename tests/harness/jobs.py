"""One builder for the spool's `Job` records that unit and fuzz tests make by hand."""

from __future__ import annotations

import hashlib
from typing import Any

from mxrules.job import Client, Job

MESSAGE_ID = "0123456789abcdefghijklmnopqrstuv01234567"


def make_job(data: bytes = b"", **changes: Any) -> Job:
    """A job as the milter writes it for a message `data`; `changes` replace any field.

    The size and SHA-256 are those of `data` unless given.
    """
    fields: dict[str, Any] = dict(
        message_id=MESSAGE_ID,
        queue_id="4Xk2Lq0F3Zz1",
        received_at="2026-01-01T00:00:00.000Z",
        rule_set="default",
        mail_from="sender@example.net",
        recipients=("user@example.com",),
        client=Client(address="192.0.2.1"),
        rules=(),
        in_stream_headers=(),
        hostname="mx.example.com",
        message_size=len(data),
        message_sha256=hashlib.sha256(data).hexdigest(),
    )
    fields.update(changes)
    return Job(**fields)
