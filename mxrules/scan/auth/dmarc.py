"""DMARC (RFC 7489): the record lookup, the organisational domain and alignment."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from email.utils import getaddresses

import dns.exception
import dns.name
import publicsuffix2

from mxrules.headblock import Head
from mxrules.scan import Verdict

from .headers import header_values, sanitize
from .resolver import Dns, DnsTempError
from .results import _POLICIES, DkimResult, DmarcRecord, DmarcResult, Policy, SpfResult


def dmarc_verdict(result: DmarcResult) -> tuple[Verdict, Policy | None]:
    detail = result.result + (f" ({sanitize(result.reason)})" if result.reason else "")
    if result.result == "pass":
        return Verdict("PASS", detail), None
    if result.result == "none":
        return Verdict("GRAY", detail), None
    if result.result == "fail":
        if result.policy in ("quarantine", "reject"):
            return Verdict("FAIL", detail), result.policy
        return Verdict("GRAY", detail), "none"
    return Verdict("PROCESSING_FAILED", detail), None


def organizational_domain(domain: str) -> str:
    """The registered domain (RFC 7489 §3.2): the public suffix plus one label.

    A name under an unlisted TLD falls under the list's default rule ("*"): its last
    label is the suffix. publicsuffix2's get_sld gets that case wrong, get_tld does not.
    """
    domain = domain.lower().rstrip(".")
    suffix = publicsuffix2.get_tld(domain) or ""
    labels, suffix_labels = domain.split("."), suffix.count(".") + 1 if suffix else 0
    if not suffix or len(labels) <= suffix_labels:
        return domain
    return ".".join(labels[-(suffix_labels + 1):])


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 §3.1: strict = the same name; relaxed = the same organizational domain."""
    a, b = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


_DMARC_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|$)", re.IGNORECASE)


def is_dmarc_record(text: str) -> bool:
    return _DMARC_VERSION.match(text) is not None


def parse_dmarc_record(text: str) -> DmarcRecord | None:
    """The policy parts of a DMARC record; None when it is not one or has no usable policy."""
    if not is_dmarc_record(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip().lower())
    p = tags.get("p", "")
    if p not in _POLICIES:
        # RFC 7489 §6.6.3: without a valid p=, a record asking for reports (rua=)
        # counts as p=none; any other is ignored.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "")
    return DmarcRecord(
        p=_policy(p),
        sp=_policy(sp) if sp in _POLICIES else _policy(p),
        adkim="s" if tags.get("adkim") == "s" else "r",
        aspf="s" if tags.get("aspf") == "s" else "r",
    )


def _policy(text: str) -> Policy:
    for policy in _POLICIES:
        if text == policy:
            return policy
    raise ValueError(text)


def evaluate_dmarc(from_domain: str, record: DmarcRecord | None, record_domain: str,
                   spf_result: SpfResult, dkim_results: Sequence[DkimResult]) -> DmarcResult:
    """RFC 7489 §6.6.2: pass when SPF or a DKIM signature passes for an aligned domain.

    record_domain is where the record was found: the From domain itself (p= applies) or
    its organizational domain (sp= applies).
    """
    if record is None:
        return DmarcResult("none", from_domain, reason="no DMARC record")
    policy = record.p if record_domain == from_domain else record.sp
    spf_aligned = aligned(spf_result.domain, from_domain, record.aspf)
    if spf_result.result == "pass" and spf_aligned:
        return DmarcResult("pass", from_domain, record, policy, "aligned SPF")
    dkim_aligned = [r for r in dkim_results if aligned(r.domain, from_domain, record.adkim)]
    passing = [r for r in dkim_aligned if r.result == "pass" and r.checked]
    if passing:
        return DmarcResult("pass", from_domain, record, policy,
                           f"aligned DKIM d={passing[0].domain}")
    # An aligned identifier that could not be checked might have passed: no verdict.
    if (spf_aligned and spf_result.result == "temperror") or any(
            r.result == "temperror" or not r.checked for r in dkim_aligned):
        return DmarcResult("temperror", from_domain, record, policy,
                           "an aligned identifier could not be checked")
    return DmarcResult("fail", from_domain, record, policy, "no aligned SPF or DKIM pass")


def author_domain(from_values: Iterable[str]) -> tuple[str | None, str]:
    """The one RFC5322.From domain DMARC applies to, or (None, why not) (RFC 7489 §6.6.1)."""
    domains = set()
    for _name, address in getaddresses(list(from_values)):
        _local, at, domain = address.rpartition("@")
        domain = domain.strip().lower().rstrip(".")
        if at and domain:
            domains.add(domain)
    if not domains:
        return None, "no author domain"
    if len(domains) > 1:
        return None, "more than one author domain"
    domain = domains.pop()
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
        dns.name.from_text(ascii_domain)
    except (UnicodeError, dns.exception.DNSException):
        return None, "author domain is not a valid name"
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+", ascii_domain):
        return None, "author domain is not a valid name"
    return ascii_domain, ""



def check_dmarc(head: Head, dns_: Dns, spf_result: SpfResult,
                 dkim_results: Sequence[DkimResult]) -> DmarcResult:
    if not head.complete:
        # A From header past the part read could make it two author domains.
        return DmarcResult("permerror", reason="header block over the limit")
    from_domain, why = author_domain(header_values(head.block, "From"))
    if from_domain is None:
        return DmarcResult("permerror", reason=why)
    try:
        record, record_domain = _find_dmarc_record(dns_, from_domain)
    except DnsTempError as exc:
        return DmarcResult("temperror", from_domain, reason=str(exc))
    return evaluate_dmarc(from_domain, record, record_domain, spf_result, dkim_results)


def _find_dmarc_record(dns_: Dns, from_domain: str) -> tuple[DmarcRecord | None, str]:
    """RFC 7489 §6.6.3: _dmarc.<From domain>, else _dmarc.<organizational domain>."""
    candidates = [from_domain]
    org = organizational_domain(from_domain)
    if org != from_domain:
        candidates.append(org)
    for domain in candidates:
        texts = [t.decode("utf-8", "replace") for t in dns_.txt(f"_dmarc.{domain}")]
        records = [t for t in texts if is_dmarc_record(t)]
        if len(records) > 1:
            return None, domain  # several records: DMARC does not apply (step 3)
        if records:
            return parse_dmarc_record(records[0]), domain
    return None, from_domain
