"""The one header-block reader through its three views, on the same files.

Each row gives one file and a limit of 24 bytes, and what DKIM (`read_head`: block,
body offset, complete), the SES payloads (`header_lines`: lines, capped) and the DSN
(`whole_header_lines`) make of it; where the views part, the row shows how.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mxrules.headblock import header_lines, read_head, whole_header_lines

LIMIT = 24
LINE = b"A: 1\r\n"


@pytest.mark.parametrize(("data", "dkim", "payload", "dsn"), [
    pytest.param(b"A: 1\r\nB: 2\r\n\r\nbody\r\n", (b"A: 1\r\nB: 2\r\n\r\n", 14, True),
                 (b"A: 1\r\nB: 2\r\n", False), b"A: 1\r\nB: 2\r\n", id="crlf"),
    pytest.param(b"A: 1\nB: 2\n\nbody\n", (b"A: 1\nB: 2\n\n", 11, True),
                 (b"A: 1\nB: 2\n", False), b"A: 1\nB: 2\n", id="lf-only"),
    pytest.param(b"A: 1\n\r\nbody", (b"A: 1\n\r\n", 7, True), (b"A: 1\n", False), b"A: 1\n",
                 id="lf-then-crlf"),
    pytest.param(b"A: 1\r\rB: 2\r\n\r\nb", (b"A: 1\r\rB: 2\r\n\r\n", 14, True),
                 (b"A: 1\r\rB: 2\r\n", False), b"A: 1\r\rB: 2\r\n", id="bare-cr-is-not-an-end"),
    pytest.param(b"A: 1\r\nB: 2", (b"A: 1\r\nB: 2", 10, True), (b"A: 1\r\nB: 2", False),
                 b"A: 1\r\nB: 2", id="no-body-no-final-newline"),
    pytest.param(b"", (b"", 0, True), (b"", False), b"", id="empty"),
    pytest.param(b"\r\nbody\r\n", (b"\r\n", 2, True), (b"", False), b"", id="no-headers"),
    pytest.param(b"\nbody\n", (b"\n", 1, True), (b"", False), b"", id="no-headers-lf"),
    pytest.param(LINE * 4 + b"\r\nbody", (LINE * 4 + b"\r\n", 26, True), (LINE * 4, False),
                 LINE * 4, id="empty-line-right-after-the-limit"),
    pytest.param(LINE * 10, (LINE * 4, 24, False), (LINE * 4, True), LINE * 4,
                 id="cut-at-a-line-end"),
    pytest.param(b"A: 1\r\nB: 123456789012345678901234567890\r\n\r\n",
                 (b"A: 1\r\nB: 123456789012345", 24, False),
                 (b"A: 1\r\nB: 123456789012345", True), b"A: 1\r\n", id="cut-mid-line"),
    pytest.param(b"A: 123456789012345678901234567890\r\n\r\n",
                 (b"A: 123456789012345678901", 24, False),
                 (b"A: 123456789012345678901", True), b"A: 123456789012345678901",
                 id="one-line-over-the-limit"),
    # The lines (25 bytes) pass the limit by one; their empty line is still read.
    pytest.param(b"A: 123456789012345678901\n\nbody",
                 (b"A: 123456789012345678901\n\n", 26, True),
                 (b"A: 123456789012345678901", True), b"A: 123456789012345678901",
                 id="lines-one-byte-over"),
])
def test_views(tmp_path: Path, data: bytes, dkim: tuple[bytes, int, bool],
               payload: tuple[bytes, bool], dsn: bytes) -> None:
    path = tmp_path / "message"
    path.write_bytes(data)
    head = read_head(io.BytesIO(data), limit=LIMIT)
    assert (head.block, head.body_offset, head.complete, head.size) == (*dkim, len(data))
    assert header_lines(str(path), LIMIT) == payload
    assert whole_header_lines(str(path), LIMIT) == dsn
