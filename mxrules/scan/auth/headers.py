"""The header text: the values of Received-SPF (RFC 7208 §9.1) and
Authentication-Results (RFC 8601) mxrules writes, and the header values it reads.

    Received-SPF: pass (mx.example.net: domain of example.com designates 192.0.2.1 as
        permitted sender) client-ip=192.0.2.1; envelope-from="alice@example.com";
        helo=mail.example.com;
    Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=alice@example.com;
        dkim=pass header.d=example.com header.s=sel1 header.b="Xb1/Tq9z";
        dkim=fail (body hash mismatch) header.d=example.com header.s=sel2 header.b=Ab3dEf9q;
        dmarc=pass (p=reject sp=reject) header.from=example.com

(folded here for reading; the values are single lines). Received-SPF follows RFC 7208
§9.1 in SES's wording ("domain of <domain>"); `identity=helo;` is added when a null
sender made HELO the identity checked. Authentication-Results has one `dkim=` per
signature (`dkim=none` when unsigned; signatures past the tenth are one `dkim=neutral`
entry and are not checked: each costs a lookup and a hash of the body). Anything from
the wire or from DNS is made one line (no CR, LF or other controls), bounded, and
quoted or escaped where RFC 7208/8601 syntax needs it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.parser import BytesHeaderParser
from email.policy import compat32

from mxrules.text import header_text

from .results import DkimResult, DmarcResult, SpfResult

# Free text from the wire or from DNS (a HELO name, an SPF record's error, a signature's
# tags) goes into header values; this much is plenty for a reader and bounds a hostile one.
_TEXT_LIMIT = 200
_ADDRESS_LIMIT = 320

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+")  # RFC 2045 token: no tspecials
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"(?:{_ATEXT}+(?:\.{_ATEXT}+)*)?@{_LABEL}(?:\.{_LABEL})*")


def sanitize(text: str, limit: int = _TEXT_LIMIT) -> str:
    """One safe line: no CR, LF or other controls, no lone surrogates, bounded length."""
    return header_text(text, limit)


def comment(text: str) -> str:
    """An RFC 5322 comment: parentheses and backslashes inside escaped as quoted-pairs."""
    body = sanitize(text).replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return f"({body})"


def quoted_string(text: str, limit: int = _ADDRESS_LIMIT) -> str:
    body = sanitize(text, limit).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{body}"'


def spf_value(text: str) -> str:
    """A Received-SPF key-value: dot-atom as is, anything else quoted (RFC 7208 §9.1)."""
    clean = sanitize(text, _ADDRESS_LIMIT)
    return clean if _DOT_ATOM.fullmatch(clean) and clean == text else quoted_string(text)


def ar_value(text: str) -> str:
    """An Authentication-Results value: an RFC 2045 token as is, else a quoted-string."""
    clean = sanitize(text, _ADDRESS_LIMIT)
    return clean if _TOKEN.fullmatch(clean) and clean == text else quoted_string(text)


def ar_address(text: str) -> str:
    """A pvalue that RFC 8601 §2.2 lets stand bare when it is [local-part]@domain."""
    clean = sanitize(text, _ADDRESS_LIMIT)
    return clean if _ADDRESS.fullmatch(clean) and clean == text else ar_value(text)


def spf_comment(spf_result: SpfResult, client_ip: str) -> str:
    """The explanation in Received-SPF, worded as SES and pyspf word it."""
    if spf_result.result == "none" and spf_result.problem:
        return spf_result.problem  # nothing was asked of the domain: say why
    d, ip = spf_result.domain or spf_result.sender, client_ip
    texts = {
        "pass": f"domain of {d} designates {ip} as permitted sender",
        "fail": f"domain of {d} does not designate {ip} as permitted sender",
        "softfail": f"transitioning domain of {d} does not designate {ip} as permitted sender",
        "neutral": f"{ip} is neither permitted nor denied by domain of {d}",
        "none": f"domain of {d} does not designate permitted sender hosts",
        "temperror": f"temporary error in processing during lookup of {d}",
        "permerror": f"permanent error in processing domain of {d}",
    }
    text = texts[spf_result.result]
    if spf_result.problem:
        text += f": {spf_result.problem}"
    return text


def received_spf(spf_result: SpfResult, *, client_ip: str, helo: str, mail_from: str,
                 authserv_id: str) -> str:
    """Value of Received-SPF (RFC 7208 §9.1), in the shape SES writes it."""
    parts = [
        spf_result.result,
        comment(f"{authserv_id}: {spf_comment(spf_result, client_ip)}"),
        f"client-ip={spf_value(client_ip)};",
        f"envelope-from={spf_value(mail_from)};",
        f"helo={spf_value(helo)};",
    ]
    if spf_result.identity == "helo":
        parts.append("identity=helo;")
    return " ".join(parts)


def authentication_results(authserv_id: str, spf_result: SpfResult,
                           dkim_results: Sequence[DkimResult], dmarc: DmarcResult) -> str:
    """Value of Authentication-Results (RFC 8601): spf, one dkim per signature, dmarc."""
    entries = [_ar_spf(spf_result)]
    entries += [_ar_dkim(r) for r in dkim_results] or ["dkim=none"]
    entries.append(_ar_dmarc(dmarc))
    return f"{ar_value(authserv_id)}; " + "; ".join(entries)


def _ar_spf(r: SpfResult) -> str:
    text = f"spf={r.result}"
    if r.problem:
        text += f" {comment(r.problem)}"
    if r.identity == "helo":
        return f"{text} smtp.helo={ar_value(r.domain)}"
    return f"{text} smtp.mailfrom={ar_address(r.sender)}"


def _ar_dkim(r: DkimResult) -> str:
    text = f"dkim={r.result}"
    if r.reason:
        text += f" {comment(r.reason)}"
    if r.domain:
        text += f" header.d={ar_value(r.domain)}"
    if r.selector:
        text += f" header.s={ar_value(r.selector)}"
    if r.signature:
        # RFC 6008: the first 8 characters tell signatures by the same d= and s= apart.
        text += f" header.b={ar_value(r.signature[:8])}"
    return text


def _ar_dmarc(r: DmarcResult) -> str:
    text = f"dmarc={r.result}"
    if r.record is not None:
        text += f" (p={r.record.p} sp={r.record.sp})"
    elif r.result != "none" and r.reason:
        text += f" {comment(r.reason)}"
    if r.from_domain:
        text += f" header.from={ar_value(r.from_domain)}"
    return text



def header_values(block: bytes, name: str) -> list[str]:
    headers = BytesHeaderParser(policy=compat32).parsebytes(block)
    return [str(v) for v in headers.get_all(name) or []]
