"""DKIM without the whole message in memory: the header block alone, the body hashed as a stream.

dkimpy's `DKIM` takes the whole message as one bytes object and, for each signature,
canonicalizes a second copy of the body; a 10 MB message cost well over 100 MB that
way.  Here dkimpy gets only the header block (mxrules.headblock's `read_head`, at
most its `HEADER_BLOCK_LIMIT` bytes), and each body hash (RFC 6376 §3.7: the body
canonicalized by c=, cut at l=, hashed with a=) is computed by `BodyHashes` from the
file in `CHUNK`-sized reads, once per distinct (c=, a=, l=) for all signatures
together.  `Verifier` (dkimpy's `DKIM`) then compares that hash with bh= where
dkimpy would, and dkimpy does everything else as it always does: tags, key, header
hash, signature.

The result is dkimpy's, byte for byte: `BodyCanon` reproduces what dkimpy computes
over the whole body, quirks included --

- the body starts after the first empty line of the message split at `\\r?\\n`, and
  every `\\r?\\n` in it counts as CRLF (a bare CR is content);
- simple (§3.4.3): trailing CRLFs dropped, one CRLF added (an empty body is CRLF);
- relaxed (§3.4.4): whitespace before a CRLF dropped, runs of space and tab made
  one space, trailing CRLFs dropped, one CRLF added, and an empty result is empty
  (a body of only whitespace and no line break is one space and a CRLF, as dkimpy
  has it);
- l= cuts the canonical body; a longer l= than the body is not an error.

`tests/unit/test_dkim_body.py` checks the stream against dkimpy's own functions for
every cut of tricky bodies, and the local-DNS tests compare whole verifications.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy, Relaxed

from mxrules.errors import MxrulesError

__all__ = ["CHUNK", "BodyCanon", "BodyHashes", "OutOfTime", "Verifier", "body_hash_key"]

CHUNK = 64 * 1024

_EOL = re.compile(rb"\r?\n")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")
# Pending trailing CRLFs are written out in pieces of this many, so a body of
# millions of empty lines never becomes one big bytes object.
_CRLF_RUN = 32 * 1024


class OutOfTime(MxrulesError):
    """The deadline passed while the body was being hashed."""


# --------------------------------------------------------------------------- canonicalization


class _Sink:
    """One hash of the canonical body, cut at l= when the signature has one."""

    def __init__(self, algorithm: bytes, length: int | None) -> None:
        self.hasher = dkim.HASH_ALGORITHMS[algorithm]()
        self.left = length

    def update(self, data: bytes) -> None:
        if self.left is None:
            self.hasher.update(data)
        elif self.left > 0:
            piece = data[:self.left]
            self.hasher.update(piece)
            self.left -= len(piece)


class BodyCanon:
    """One body canonicalization over a stream of chunks, written to `sinks`.

    Held back between chunks, so no chunk boundary changes the result: a CR at a
    chunk's end (it may start a CRLF), whitespace at its end (relaxed: it may end a
    line), and CRLFs at its end (as a count: they are dropped if nothing follows).
    """

    def __init__(self, relaxed: bool, sinks: Iterable[Callable[[bytes], None]]) -> None:
        self.relaxed = relaxed
        self.sinks = list(sinks)
        self.cr = False
        self.space = False
        self.crlfs = 0
        self.emitted = False

    def feed(self, data: bytes) -> None:
        if self.cr:
            data = b"\r" + data
        self.cr = data.endswith(b"\r")
        if self.cr:
            data = data[:-1]
        self._normalized(_EOL.sub(b"\r\n", data))

    def close(self) -> None:
        if self.cr:  # a bare CR at the very end is content
            self.cr = False
            self._normalized(b"\r")
        if self.space:  # whitespace with no line break after it stays, as one space
            self.space = False
            self._emit(b" ")
        if self.emitted or not self.relaxed:
            self._write(b"\r\n")

    def _normalized(self, data: bytes) -> None:
        if self.relaxed:
            if self.space:
                data = b" " + data
            kept = data.rstrip(b"\t ")
            self.space = len(kept) != len(data)
            data = _WSP.sub(b" ", _TRAILING_WSP.sub(b"\r\n", kept))
        end = len(data)
        while end >= 2 and data[end - 2:end] == b"\r\n":
            end -= 2
        if end == 0:
            self.crlfs += len(data) // 2
            return
        self._emit(data[:end])
        self.crlfs = (len(data) - end) // 2

    def _emit(self, data: bytes) -> None:
        while self.crlfs:
            run = min(self.crlfs, _CRLF_RUN)
            self._write(b"\r\n" * run)
            self.crlfs -= run
        self._write(data)
        self.emitted = True

    def _write(self, data: bytes) -> None:
        for sink in self.sinks:
            sink(data)


# --------------------------------------------------------------------------- body hashes

# (body canonicalization is relaxed, a=, l=): signatures that agree share one hash.
BodyHashKey = tuple[bool, bytes, int | None]


def body_hash_key(sig: dict[bytes, bytes]) -> BodyHashKey:
    """What a signature's body hash depends on; raises as dkimpy's verify would.

    The same calls as dkimpy's `verify_sig_process`, in its order, so a tag that
    makes this raise makes dkimpy raise the same error before it compares bh=.
    """
    policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    algorithm = sig[b"a"]
    dkim.HASH_ALGORITHMS[algorithm]
    length = int(sig[b"l"]) if b"l" in sig else None
    return policy.body_algorithm is Relaxed, algorithm, length


class BodyHashes:
    """The body hashes of one message file, computed in one pass on first use."""

    def __init__(self, path: str, offset: int, deadline: float) -> None:
        self.path = path
        self.offset = offset
        self.deadline = deadline
        self.wanted: set[BodyHashKey] = set()
        self.digests: dict[BodyHashKey, bytes] = {}

    def want(self, key: BodyHashKey) -> None:
        """Announce a hash that will be asked for, so one pass computes them all."""
        self.wanted.add(key)

    def digest(self, key: BodyHashKey) -> bytes:
        if key not in self.digests:
            self.wanted.add(key)
            self.digests.update(self._hash(self.wanted - self.digests.keys()))
        return self.digests[key]

    def _hash(self, keys: set[BodyHashKey]) -> dict[BodyHashKey, bytes]:
        sinks = {key: _Sink(key[1], key[2]) for key in keys}
        canons = [BodyCanon(relaxed, [s.update for k, s in sinks.items() if k[0] == relaxed])
                  for relaxed in {key[0] for key in keys}]
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            while chunk := fh.read(CHUNK):
                if time.monotonic() >= self.deadline:
                    raise OutOfTime("out of time")
                for canon in canons:
                    canon.feed(chunk)
        for canon in canons:
            canon.close()
        return {key: sink.hasher.digest() for key, sink in sinks.items()}


# --------------------------------------------------------------------------- dkimpy


class Verifier(dkim.DKIM):
    """dkimpy's verifier over the header block, with the body hashes from `BodyHashes`.

    dkimpy hashes its own (empty) body and compares that with bh=; it is handed a
    copy of the signature's tags whose bh= is what that comparison needs to come
    out as the comparison with the real body did.  The DKIM-Signature header itself
    is hashed from the header as received (`sig_header`), not from these tags.
    """

    def __init__(self, head: bytes, bodies: BodyHashes, **kwargs: Any) -> None:
        super().__init__(head, **kwargs)
        self.bodies = bodies

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: Any,
                           sig_header: Any, dnsfunc: Any) -> Any:
        if b"bh" in sig:
            sig = self._checked_body(sig)
        return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def _checked_body(self, sig: dict[bytes, bytes]) -> dict[bytes, bytes]:
        try:
            key = body_hash_key(sig)
            claimed = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
        except Exception:
            return sig  # dkimpy raises the same error itself, before it compares
        # What dkimpy will compute over the body it has (none), as it computes it.
        body = CanonicalizationPolicy.from_c_value(
            sig.get(b"c", b"simple/simple")).canonicalize_body(self.body)
        if key[2] is not None:
            body = body[:key[2]]
        own = dkim.HASH_ALGORITHMS[key[1]](body).digest()
        matches = self.bodies.digest(key) == claimed
        return {**sig, b"bh": base64.b64encode(own if matches else bytes(b ^ 0xFF for b in own))}
