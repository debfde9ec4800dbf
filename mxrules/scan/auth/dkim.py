"""DKIM (RFC 6376) through dkimpy: every signature (up to a bound) judged on its own."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import dkim
import dkim.util

from mxrules.headblock import Head
from mxrules.scan import Status, Verdict
from mxrules.scan.dkim_body import BodyHashes, OutOfTime, Verifier, body_hash_key

from .headers import header_values, sanitize
from .resolver import Dns, DnsTempError
from .results import DkimCode, DkimResult

log = logging.getLogger("mxrules.scan.auth")

# Each signature costs a DNS lookup and a hash of the body: a hostile message carrying
# hundreds must not cost hundreds (nor an Authentication-Results line to match).
_MAX_SIGNATURES = 10

DKIM_STATUS: dict[str, Status] = {
    "pass": "PASS",
    "fail": "FAIL",
    "permerror": "FAIL",
    "neutral": "PROCESSING_FAILED",
    "temperror": "PROCESSING_FAILED",
}


def dkim_verdict(results: Sequence[DkimResult]) -> Verdict:
    if not results:
        return Verdict("GRAY", "no signature")
    statuses = {DKIM_STATUS[r.result] for r in results}
    detail = "; ".join(
        f"{r.result} d={sanitize(r.domain)} s={sanitize(r.selector)}"
        + (f" ({sanitize(r.reason)})" if r.reason else "")
        for r in results
    )
    if "FAIL" in statuses:
        return Verdict("FAIL", detail)
    if "PROCESSING_FAILED" in statuses:
        return Verdict("PROCESSING_FAILED", detail)
    return Verdict("PASS", detail)


class _KeyFetch:
    """dkimpy's dnsfunc for one signature, remembering what DNS said.

    dkimpy turns a missing key, an unusable key and a DNS timeout alike into
    verify() == False; what this saw tells them apart.
    """

    def __init__(self, dns_: Dns) -> None:
        self.dns = dns_
        self.called = False
        self.key: bytes | None = None
        self.error = ""

    def __call__(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        self.called = True
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            return None
        try:
            records = self.dns.txt(text)
        except DnsTempError as exc:
            self.error = str(exc)
            raise dkim.DnsTimeoutError(str(exc)) from None
        # RFC 6376 §3.6.2.2 leaves several records undefined; prefer one holding a key.
        keys = [r for r in records if b"p=" in r] or records
        self.key = keys[0] if keys else None
        return self.key



class _QuietLogger:
    """dkimpy logs a hostile signature's bad key at ERROR; here that is an outcome."""

    def _log(self, msg: str, *args: Any, **kwargs: Any) -> None:
        log.debug("dkimpy: " + str(msg), *args)

    debug = info = warning = error = exception = _log

    def isEnabledFor(self, level: int) -> bool:  # logging.Logger's name, as dkimpy calls it
        return False


def _signature_tags(value: bytes) -> dict[bytes, bytes]:
    try:
        tags: dict[bytes, bytes] = dkim.util.parse_tag_value(value)
    except Exception:  # any parse failure of a hostile header is "malformed"
        return {}
    return tags


def _dkim_entry(tags: dict[bytes, bytes], result: DkimCode, reason: str = "",
                checked: bool = True) -> DkimResult:
    def text(key: bytes) -> str:
        return re.sub(r"\s+", "", tags.get(key, b"").decode("ascii", "replace"))

    return DkimResult(result, text(b"d").lower(), text(b"s"), text(b"b"), reason, checked)


# A DKIM-Signature line as dkimpy or Python's email parser could read one (a line
# starts after LF, or after a lone CR for the email parser): without one there is
# nothing to verify and dkimpy is not run at all.
_SIGNATURE_LINE = re.compile(rb"(?:\A|[\r\n])dkim-signature[\t ]*:", re.IGNORECASE)


def check_dkim(path: str, head: Head, dns_: Dns, *, complete: bool) -> list[DkimResult]:
    if head.complete and not _SIGNATURE_LINE.search(head.block):
        # Unsigned, whatever its size: GRAY, as SES says of a message not DKIM-signed
        # (a large unsigned message is common now that every message is checked).
        return []
    if not complete or not head.complete:
        # Over a size limit: the signatures in the headers read are reported, unverified.
        reason = "message over the size limit" if not complete else "header block over the limit"
        return [_dkim_entry(_signature_tags(v.encode("ascii", "surrogateescape")), "neutral",
                            reason, checked=False)
                for v in header_values(head.block, "DKIM-Signature")
                ] or [DkimResult("neutral", reason=reason, checked=False)]
    bodies = BodyHashes(path, head.body_offset, dns_.deadline)
    try:
        verifier = Verifier(head.block, bodies, logger=_QuietLogger(),
                            timeout=dns_.settings.timeout)
    except Exception as exc:  # dkimpy's own parser refusing the message
        return [_dkim_entry(_signature_tags(v.encode("ascii", "surrogateescape")), "neutral",
                            f"message not parseable: {exc}")
                for v in header_values(head.block, "DKIM-Signature")]
    signatures = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
    for value in signatures[:_MAX_SIGNATURES]:
        _announce(bodies, value)
    results = [_verify_one(verifier, index, value, dns_)
               for index, value in enumerate(signatures[:_MAX_SIGNATURES])]
    if len(signatures) > _MAX_SIGNATURES:
        extra = len(signatures) - _MAX_SIGNATURES
        results.append(DkimResult("neutral", reason=f"{extra} more signatures not checked",
                                  checked=False))
    return results


def _announce(bodies: BodyHashes, value: bytes) -> None:
    """Tell `bodies` a signature's hash will be needed, so one pass of the file makes all."""
    # A signature whose tags make this raise is refused by dkimpy itself: nothing to hash.
    with contextlib.suppress(Exception):
        bodies.want(body_hash_key(_signature_tags(value)))


def _verify_one(verifier: Any, index: int, value: bytes, dns_: Dns) -> DkimResult:
    tags = _signature_tags(value)
    if not tags:
        return _dkim_entry(tags, "neutral", "signature not parseable")
    expires = tags.get(b"x", b"").strip()
    if expires.isdigit() and int(expires) < time.time():
        return _dkim_entry(tags, "fail", "signature expired")
    if time.monotonic() >= dns_.deadline:
        # Verifying may have to hash the whole body: no time, no work.
        return _dkim_entry(tags, "temperror", "out of time")
    fetch = _KeyFetch(dns_)
    try:
        ok = verifier.verify(idx=index, dnsfunc=fetch)
    except OutOfTime:
        return _dkim_entry(tags, "temperror", "out of time")
    except dkim.ValidationError as exc:
        # Raised after the key was fetched: the body hash did not match. Before: the
        # signature's own tags were wrong.
        if fetch.called and fetch.key is not None:
            return _dkim_entry(tags, "fail", str(exc).split(" (")[0])
        return _dkim_entry(tags, "neutral", f"bad signature: {exc}")
    except (dkim.KeyFormatError, dkim.UnknownKeyTypeError) as exc:
        return _dkim_entry(tags, "permerror", f"unusable key: {exc}")
    except Exception as exc:  # dkimpy on hostile input: undecided, never a crash
        return _dkim_entry(tags, "neutral", f"not verifiable: {exc}")
    if ok:
        return _dkim_entry(tags, "pass")
    if fetch.error:
        return _dkim_entry(tags, "temperror", fetch.error)
    if fetch.key is None:
        return _dkim_entry(tags, "permerror", "no key for signature")
    try:
        dkim.evaluate_pk(b"", fetch.key)
    except Exception:
        return _dkim_entry(tags, "permerror", "unusable key")
    return _dkim_entry(tags, "fail", "signature did not verify")
