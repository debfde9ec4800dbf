"""The streamed DKIM body hash and header block against dkimpy's own whole-message code."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import dkim
import pytest
from dkim.canonicalization import Relaxed, Simple

from mxrules import headblock
from mxrules.headblock import read_head
from mxrules.scan.dkim_body import BodyCanon, BodyHashes, OutOfTime

BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\r\n", id="one-crlf"),
    pytest.param(b"\r\n\r\n\r\n", id="only-crlfs"),
    pytest.param(b"Hello.\r\n", id="one-line"),
    pytest.param(b"Hello.", id="no-final-crlf"),
    pytest.param(b"Hello.\r\n\r\n\r\n", id="trailing-empty-lines"),
    pytest.param(b"a  \t b \t\r\nc\t\r\n  \r\n\t\r\n", id="whitespace-runs-and-blank-lines"),
    pytest.param(b"   ", id="only-spaces"),
    pytest.param(b" \t \r\n \r\n", id="only-whitespace-lines"),
    pytest.param(b"bare\nlf\n\nlines\n", id="bare-lf"),
    pytest.param(b"bare\rcr\r\rx\r", id="bare-cr"),
    pytest.param(b"cr before crlf\r\r\n\r\r\n", id="cr-crlf"),
    pytest.param(b"a \r\n\r\n \r\nb \r \n\t", id="mixed"),
    pytest.param(b"x\r\n" + b"\r\n" * 5000 + b"y  \r\n", id="many-empty-lines-then-text"),
    pytest.param(b"\x00\xff\xfe \t\x80\r\n\r\n", id="eight-bit"),
    pytest.param(b"\r", id="lone-cr"),
    pytest.param(b"\n", id="lone-lf"),
    pytest.param(b" \r", id="space-cr"),
]
CHUNKS = [1, 2, 3, 7, 64 * 1024]


def reference(body: bytes, relaxed: bool) -> bytes:
    """dkimpy's canonical body: its parser's line ends, then its canonicalization."""
    normalized = b"\r\n".join(re.split(b"\r?\n", body))
    return (Relaxed if relaxed else Simple).canonicalize_body(normalized)


def streamed(body: bytes, relaxed: bool, chunk: int) -> bytes:
    out: list[bytes] = []
    canon = BodyCanon(relaxed, [out.append])
    for i in range(0, len(body), chunk):
        canon.feed(body[i:i + chunk])
    canon.close()
    return b"".join(out)


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("relaxed", [pytest.param(False, id="simple"),
                                     pytest.param(True, id="relaxed")])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_streamed_canonical_body_is_dkimpys(body: bytes, relaxed: bool, chunk: int) -> None:
    assert streamed(body, relaxed, chunk) == reference(body, relaxed)


def test_every_cut_of_a_tricky_body_gives_the_same_result() -> None:
    body = b"a \t\r\n\r\n \r \n\r\r\n x\t\t\r\n\r\n"
    for relaxed in (False, True):
        want = reference(body, relaxed)
        for cut in range(len(body) + 1):
            out: list[bytes] = []
            canon = BodyCanon(relaxed, [out.append])
            canon.feed(body[:cut])
            canon.feed(body[cut:])
            canon.close()
            assert b"".join(out) == want, (relaxed, cut)


HEAD = b"From: a@example.com\r\nSubject: x\r\n"


@pytest.mark.parametrize(("message", "block", "offset"), [
    pytest.param(HEAD + b"\r\nbody\r\n", HEAD + b"\r\n", len(HEAD) + 2, id="crlf"),
    pytest.param(b"From: a\nX: y\n\nbody\n", b"From: a\nX: y\n\n", 14, id="lf"),
    pytest.param(b"From: a\n\r\nbody", b"From: a\n\r\n", 10, id="lf-then-crlf"),
    pytest.param(b"\r\nbody", b"\r\n", 2, id="no-headers"),
    pytest.param(HEAD, HEAD, len(HEAD), id="no-body"),
    pytest.param(b"From: a\r\rX: y\r\n\r\nb", b"From: a\r\rX: y\r\n\r\n", 17,
                 id="bare-cr-is-not-an-end"),
])
@pytest.mark.parametrize("chunk", [1, 2, 3, 64 * 1024])
def test_header_block_ends_where_dkimpy_ends_it(message: bytes, block: bytes, offset: int,
                                                chunk: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headblock, "CHUNK", chunk)  # the end split across reads
    head = read_head(io.BytesIO(message), limit=1024)
    assert (head.block, head.body_offset, head.complete, head.size) == (
        block, offset, True, len(message))
    headers, body = dkim.rfc822_parse(message)
    assert dkim.rfc822_parse(block)[0] == headers
    assert body == b"\r\n".join(re.split(b"\r?\n", message[offset:]))


def test_header_block_over_the_limit_is_cut() -> None:
    message = b"X: " + b"y" * 5000 + b"\r\n\r\nbody"
    head = read_head(io.BytesIO(message), limit=1000)
    assert (head.block, head.complete, head.size) == (message[:1000], False, len(message))


def test_body_hashes_one_pass_for_every_signature(tmp_path: Path) -> None:
    body = b"Hello  \r\nworld\r\n\r\n"
    path = tmp_path / "m"
    path.write_bytes(HEAD + b"\r\n" + body)
    hashes = BodyHashes(str(path), len(HEAD) + 2, deadline=float("inf"))
    keys = [(False, b"rsa-sha256", None), (True, b"rsa-sha256", None),
            (True, b"rsa-sha1", 5), (False, b"rsa-sha256", 100)]
    for key in keys:
        hashes.want(key)
    got = [hashes.digest(k) for k in keys]
    assert got == [
        hashlib.sha256(reference(body, False)).digest(),
        hashlib.sha256(reference(body, True)).digest(),
        hashlib.sha1(reference(body, True)[:5]).digest(),
        hashlib.sha256(reference(body, False)).digest(),
    ]


def test_body_hash_past_the_deadline_is_out_of_time(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(HEAD + b"\r\nbody\r\n")
    with pytest.raises(OutOfTime):
        BodyHashes(str(path), len(HEAD) + 2, deadline=0.0).digest((False, b"rsa-sha256", None))
