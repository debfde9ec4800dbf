"""messageIds: opaque, lowercase, unique per accepted message.

SES's messageId: docs/ses-compatibility.md, "messageId".

40 characters of base32hex (0-9, a-v), like SES's: 64 bits of nanosecond time
then 136 random bits.  The time prefix makes ids sort by arrival, which keeps
spool listings and S3 keys in order; the random part makes them unguessable
and unique across hosts without coordination.
"""

from __future__ import annotations

import base64
import os
import re
import time

_ID = re.compile(r"[0-9a-v]{40}")  # fullmatch: `$` would also allow a trailing newline


def new_message_id(now_ns: int | None = None) -> str:
    stamp = (now_ns if now_ns is not None else time.time_ns()).to_bytes(8, "big")
    raw = stamp + os.urandom(17)  # 25 bytes = 200 bits = 40 base32 characters
    return base64.b32hexencode(raw).decode("ascii").lower()


def is_message_id(text: str) -> bool:
    return bool(_ID.fullmatch(text))
