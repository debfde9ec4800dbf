"""Reading a spooled message's header block without its body: one reader, three views.

Where the header block ends is decided once, as dkimpy decides it (dkim.rfc822_parse
splits at \\r?\\n and stops at the first empty line): an empty first line, or a line
break followed by an empty line.  Python's email parser, which also treats a lone CR
as a line break, never ends the headers later than this.  The file is read in chunks
and never past the chunk holding that end (a 40 MB body is never read for a few KB of
headers), and never more than `limit` bytes of headers are held.

The views differ on purpose, by what their readers need:

- `read_head`: DKIM (mxrules.scan.dkim_body) -- the block with its empty line, where
  the body starts, and the file's size; over the limit, the first `limit` bytes.
- `header_lines`: the SES payloads (mxrules.payload) -- the header lines without
  the empty line, at most `limit` bytes, and whether the limit cut them (which
  makes `headersTruncated`); a cut may fall inside a line, whose start is kept.
- `whole_header_lines`: the DSN's attached headers (actions.bounce) -- cut at the
  last whole line within `limit`, since a DSN must not attach half a header field.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import IO

__all__ = ["CHUNK", "HEADER_BLOCK_LIMIT", "Head", "header_lines", "read_head",
           "whole_header_lines"]

# Never more of a header block than this; Postfix hands a milter at most about 60 KB
# of one header, so only a hostile message has more.
HEADER_BLOCK_LIMIT = 1024 * 1024
CHUNK = 64 * 1024

_HEADER_END = re.compile(rb"\A\r?\n|\n\r?\n")


@dataclass(frozen=True)
class Head:
    block: bytes  # the header lines and the empty line that ends them (if any)
    body_offset: int  # where the body starts in the file
    complete: bool  # False: the header block is longer than the limit, `block` is cut
    size: int  # the whole file's size


def read_head(fh: IO[bytes], limit: int = HEADER_BLOCK_LIMIT) -> Head:
    """The header block of the message open in `fh`, never the body."""
    size = fh.seek(0, os.SEEK_END)
    fh.seek(0)
    block, _lines_end, complete = _read_block(fh, limit)
    return Head(block, len(block), complete, size)


def header_lines(path: str, limit: int = HEADER_BLOCK_LIMIT) -> tuple[bytes, bool]:
    """The header lines (without the empty line), at most `limit` bytes, and whether
    the limit cut them."""
    lines, complete = _lines(path, limit)
    if len(lines) > limit:
        return lines[:limit], True
    return lines, not complete


def whole_header_lines(path: str, limit: int) -> bytes:
    """The header lines (without the empty line); over `limit` bytes, the whole lines
    within it (or the first `limit` bytes when not even one line fits)."""
    lines, complete = _lines(path, limit)
    if complete and len(lines) <= limit:
        return lines
    head = lines[:limit]
    return head[:head.rindex(b"\n") + 1] if b"\n" in head else head


def _lines(path: str, limit: int) -> tuple[bytes, bool]:
    """The block read from `path`, without its empty line, and whether it was complete.

    Unbuffered, so that nothing past the chunk holding the end is asked of the file
    (a FIFO whose writer stays open is never waited on).
    """
    with open(path, "rb", buffering=0) as fh:
        block, lines_end, complete = _read_block(fh, limit)
    return block[:lines_end], complete


def _read_block(fh: IO[bytes], limit: int) -> tuple[bytes, int, bool]:
    """The header block with its empty line, where its header lines end, and False
    when `limit` cut it first.

    Up to two bytes past `limit` are read, so that an empty line right after it is
    still found.
    """
    data = bytearray()
    while len(data) < limit + 2:
        chunk = fh.read(min(CHUNK, limit + 2 - len(data)))
        if not chunk:
            # No empty line: everything is header (dkimpy's body is then empty).
            return bytes(data), len(data), True
        start = max(0, len(data) - 2)  # an end split across two reads
        data += chunk
        end = _HEADER_END.search(data, start)
        if end is not None:
            # A match at 0 is an empty first line (no headers); any other starts with
            # the line break that ends the last header line.
            lines_end = end.start() + 1 if end.start() else 0
            return bytes(data[:end.end()]), lines_end, True
    return bytes(data[:limit]), limit, False
