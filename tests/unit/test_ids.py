"""messageIds: 40 characters of base32hex, unique, sorting by time.

SES's messageId: docs/ses-compatibility.md, "messageId".
"""

from __future__ import annotations

import base64
import re
import time

import pytest

from mxrules.ids import is_message_id, new_message_id

ID = re.compile(r"[0-9a-v]{40}")


def test_shape() -> None:
    for _ in range(200):
        assert ID.fullmatch(new_message_id())


def test_unique() -> None:
    ids = {new_message_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    same_instant = {new_message_id(now_ns=1_700_000_000_000_000_000) for _ in range(1_000)}
    assert len(same_instant) == 1_000


def test_ids_sort_by_time() -> None:
    stamps = [0, 1, 255, 256, 10**9, 1_700_000_000_000_000_000, 1_700_000_000_000_000_001,
              2**63, 2**64 - 1]
    ids = [new_message_id(now_ns=t) for t in stamps]
    assert sorted(ids) == ids
    assert all(ID.fullmatch(i) for i in ids)


def _stamp(message_id: str) -> int:
    """The nanosecond time at the front of an id."""
    return int.from_bytes(base64.b32hexdecode(message_id.upper())[:8], "big")


def test_the_time_prefix_comes_from_the_clock() -> None:
    assert _stamp(new_message_id(now_ns=1_234_567_890_123)) == 1_234_567_890_123
    before = time.time_ns()
    made = [new_message_id() for _ in range(100)]
    after = time.time_ns()
    assert all(before <= _stamp(m) <= after for m in made)
    # Ids sort as their times do; equal times (a coarse clock) are ordered by the random tail.
    assert [_stamp(m) for m in sorted(made)] == sorted(_stamp(m) for m in made)


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        pytest.param("0" * 40, True, id="zeros"),
        pytest.param("v" * 40, True, id="highest-digit"),
        pytest.param("w" * 40, False, id="beyond-base32hex"),
        pytest.param("A" * 40, False, id="uppercase"),
        pytest.param("0" * 39, False, id="too-short"),
        pytest.param("0" * 41, False, id="too-long"),
        pytest.param("0" * 40 + "\n", False, id="trailing-newline"),
        pytest.param("", False, id="empty"),
        pytest.param("tmp", False, id="a-name"),
    ],
)
def test_is_message_id(text: str, valid: bool) -> None:
    assert is_message_id(text) is valid
