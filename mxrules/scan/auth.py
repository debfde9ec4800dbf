"""SPF, DKIM and DMARC: SES's `spfVerdict`, `dkimVerdict`, `dmarcVerdict` (see
docs/ses-compatibility.md, "Authentication and scans").

`check()` takes the spooled message and the SMTP facts (client IP, HELO, MAIL FROM)
and returns an `AuthResult`: three `Verdict`s, the DMARC policy, and the values of
the `Received-SPF` (RFC 7208 §9.1) and `Authentication-Results` (RFC 8601) headers
mxrules adds. It never raises: anything unexpected is PROCESSING_FAILED with the
error in the verdict's detail, and the mail goes on (as in SES).

LIBRARIES

The protocols are pyspf (SPF, RFC 7208) and dkimpy (DKIM, RFC 6376); DMARC (RFC 7489)
is the record lookup, the organisational domain (publicsuffix2, Debian's list) and the
alignment rules, written here.

MEMORY

The message is never read whole: the From header (DMARC) and the DKIM-Signature
headers come from the header block alone (at most 1 MiB; a longer one is hostile:
DKIM is neutral and DMARC permerror, "header block over the limit"). dkimpy is run
only when a DKIM-Signature is there, over the header block, and the body hashes
are computed from the file as a stream (`mxrules.scan.dkim_body`), with results
identical to dkimpy's over the whole message. authheaders was not used: it runs pyspf through its
default resolver, verifies only the first DKIM signature, reports every DKIM error as
`fail`, and its DMARC DNS hook is meant for tests.

DNS

Every lookup goes through one dnspython resolver per `DnsSettings`, shared by every
check of the process (the configured name servers, `ip` or `ip:port`, or the system's
resolv.conf when none are given), with a bounded answer cache: SPF, DKIM and DMARC run
on every message, and a sender's records are asked once per TTL, not once per message.
One check serves every recipient of a message (SES's verdicts do not depend on the
recipient), so recipients never multiply lookups. A query may take
`DnsSettings.timeout`, and never more than what is left of the check's DNS budget:
`timeout` less a small reserve (10%, at most 0.5 s) for the work after the last answer,
so a caller waiting exactly `timeout` gets the result. A server that never answers
therefore costs the check under `timeout`, and what could not be looked up in time is a
temporary error.

- dkimpy: `DKIM.verify(dnsfunc=...)`, a per-call hook (`_KeyFetch`).
- DMARC: the resolver directly.
- pyspf has no per-query hook: `spf.query.dns()` calls the module function
  `spf.DNSLookup`. A check replaces that function by a dispatcher (once; again only
  if something else replaced it since) that reads the resolver of the check running in
  the current thread from a `ContextVar`; with no check running it calls pyspf's own
  function, so other users of pyspf in the process see no change. This is the one
  global mxrules touches, and it holds no per-message state.

HEADERS

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

MAPPING TO SES STATUSES

SES documents (receiving-email-notifications-contents, and the SES event types in the
AWS SDKs) for SPF: GRAY "there is no SPF policy under the domain used in the MAIL FROM
command", PROCESSING_FAILED "an issue that prevents Amazon SES from checking the SPF
record, for example DNS queries are failing"; for DKIM: GRAY "the message is not
DKIM-signed", PROCESSING_FAILED "for example, DNS queries are failing or the DKIM
signature header is not formatted properly"; for DMARC: GRAY "the message failed DMARC
authentication, and the sending domain does not have a DMARC policy, or uses the p=none
policy", and `dmarcPolicy` (none|quarantine|reject) "only appears if the message fails
DMARC authentication". SES's sample Lambda event shows `dmarc=none` (no record) with
dmarcVerdict GRAY. The rest is mxrules's choice [mxrules]:

    SPF   pass -> PASS   fail -> FAIL   softfail, neutral, none -> GRAY
          temperror -> PROCESSING_FAILED (DNS failing, or out of time)
          permerror -> PROCESSING_FAILED (the record exists but cannot be evaluated:
                       SES's "an issue prevents checking the SPF record"; not GRAY,
                       which SES keeps for "no policy")
    DKIM  per signature: pass; fail (the signature or body hash does not verify, or the
          signature expired); permerror (no key, revoked or unusable key: the signature
          can never verify, RFC 6376 §6.1.2 PERMFAIL) counts as a failure; neutral (the
          DKIM-Signature cannot be parsed, or the message is over the size limit) and
          temperror (DNS) cannot be decided.
          No signature -> GRAY; any failed signature -> FAIL; else any undecided ->
          PROCESSING_FAILED; else (every signature passes) -> PASS.
    DMARC pass -> PASS; fail under p=/sp= quarantine or reject -> FAIL with that policy;
          fail under none -> GRAY with policy "none" (SES's GRAY wording; the message
          did fail, so `dmarc_policy` is set; the scan and payload code put dmarcPolicy
          in a receipt only beside FAIL); no record -> GRAY without a policy; DNS
          failing, an aligned identifier that could not be checked, or no single From
          domain -> PROCESSING_FAILED. pct= is ignored: the published policy is
          reported as is.
    Over max_size the body is not hashed: DKIM is PROCESSING_FAILED ("over the size
    limit"); SPF is unaffected and DMARC still passes on aligned SPF.
    Without a valid client IP (a local submission) SPF is none -> GRAY.

One SES sample also shows dkimVerdict GRAY for a message whose only (passing)
signature is not from the From domain, as if SES judged DKIM for the author's domain
only. That sample is the only hint; mxrules judges every signature, as above.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, Literal

import dkim
import dkim.util
import dns.exception
import dns.name
import dns.resolver
import dns.ttl
import publicsuffix2
import spf

from mxrules.configschema import default
from mxrules.scan import Status, Verdict
from mxrules.scan.dkim_body import BodyHashes, Head, OutOfTime, Verifier, body_hash_key, read_head

log = logging.getLogger(__name__)

Policy = Literal["none", "quarantine", "reject"]
_POLICIES: tuple[Policy, ...] = ("none", "quarantine", "reject")

# Free text from the wire or from DNS (a HELO name, an SPF record's error, a signature's
# tags) goes into header values; this much is plenty for a reader and bounds a hostile one.
_TEXT_LIMIT = 200
_ADDRESS_LIMIT = 320
# Each signature costs a DNS lookup and a hash of the body: a hostile message carrying
# hundreds must not cost hundreds (nor an Authentication-Results line to match).
_MAX_SIGNATURES = 10


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DnsSettings:
    """Where and how long to ask DNS.

    nameservers: "192.0.2.53", "192.0.2.53:5353", "2001:db8::53" or "[2001:db8::53]:5353";
    empty means the system resolver (/etc/resolv.conf). One port per address: dnspython
    keys ports by address. timeout: seconds one lookup may take, retries included.
    """

    nameservers: tuple[str, ...] = ()
    timeout: float = default("scan.dns.timeout")

    def __post_init__(self) -> None:
        # Validated on construction so a bad config fails at load, not per message.
        ports: dict[str, int] = {}
        for server in self.nameservers:
            address, port = parse_nameserver(server)
            if ports.setdefault(address, port) != port:
                raise ValueError(f"name server {address} given with two ports")
        if not self.timeout > 0:
            raise ValueError(f"DNS timeout must be positive, got {self.timeout!r}")


def parse_nameserver(text: str) -> tuple[str, int]:
    """("ip", port) from "ip", "ip:port" or "[ipv6]:port"; ValueError when it is neither."""
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad name server {text!r}")
        port = rest[1:] or "53"
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ValueError(f"bad name server {text!r}: want ip or ip:port") from None
    if not 0 < number < 65536:
        raise ValueError(f"bad name server {text!r}: port out of range")
    return str(address), number


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AuthResult:
    spf: Verdict
    dkim: Verdict
    dmarc: Verdict
    dmarc_policy: Policy | None  # set when DMARC failed (see the module docstring)
    received_spf: str  # value of a Received-SPF: header
    authentication_results: str  # value of an Authentication-Results: header


SpfCode = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
DkimCode = Literal["pass", "fail", "neutral", "temperror", "permerror"]
DmarcCode = Literal["pass", "fail", "none", "temperror", "permerror"]


@dataclass(frozen=True)
class SpfResult:
    result: SpfCode
    identity: Literal["mailfrom", "helo"]
    sender: str  # the address checked: MAIL FROM, or postmaster@HELO for a null sender
    domain: str  # its domain: what DMARC aligns with
    problem: str = ""  # why, for temperror and permerror


@dataclass(frozen=True)
class DkimResult:
    """One DKIM-Signature's outcome."""

    result: DkimCode
    domain: str = ""  # d=
    selector: str = ""  # s=
    signature: str = ""  # b=, whitespace removed
    reason: str = ""  # why, when not pass
    checked: bool = True  # False: never verified (message over the size limit)


@dataclass(frozen=True)
class DmarcRecord:
    p: Policy
    sp: Policy
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"


@dataclass(frozen=True)
class DmarcResult:
    result: DmarcCode
    from_domain: str = ""
    record: DmarcRecord | None = None
    policy: Policy | None = None  # the policy that applies to from_domain (p= or sp=)
    reason: str = ""


# --------------------------------------------------------------------------- status mapping

SPF_STATUS: dict[str, Status] = {
    "pass": "PASS",
    "fail": "FAIL",
    "softfail": "GRAY",
    "neutral": "GRAY",
    "none": "GRAY",
    "temperror": "PROCESSING_FAILED",
    "permerror": "PROCESSING_FAILED",
}

DKIM_STATUS: dict[str, Status] = {
    "pass": "PASS",
    "fail": "FAIL",
    "permerror": "FAIL",
    "neutral": "PROCESSING_FAILED",
    "temperror": "PROCESSING_FAILED",
}


def spf_verdict(spf_result: SpfResult) -> Verdict:
    detail: str = spf_result.result
    if spf_result.problem:
        detail += f": {sanitize(spf_result.problem)}"
    return Verdict(SPF_STATUS[spf_result.result], detail)


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


# --------------------------------------------------------------------------- DMARC logic


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


# --------------------------------------------------------------------------- header values

_UNSAFE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+")  # RFC 2045 token: no tspecials
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"(?:{_ATEXT}+(?:\.{_ATEXT}+)*)?@{_LABEL}(?:\.{_LABEL})*")


def sanitize(text: str, limit: int = _TEXT_LIMIT) -> str:
    """One safe line: no CR, LF or other controls, no lone surrogates, bounded length."""
    text = _UNSAFE.sub(" ", text)
    # Undecodable bytes arrive as lone surrogates (surrogateescape); they cannot be
    # encoded when the header is written.
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = re.sub(r" {2,}", " ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


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


# --------------------------------------------------------------------------- DNS


class DnsTempError(Exception):
    """A lookup that may work later: timeout, SERVFAIL/REFUSED, out of time."""


# Answers kept across messages (each for its TTL, at most an hour): a sender's SPF,
# DMARC and key records are asked once, not once per message.  Bounded twice: in
# entries, and per answer (a larger one is used but not kept), so a hostile zone's
# huge records cannot grow the milter: at most about 4096 x 8 KiB of answers.
DNS_CACHE_ENTRIES = 4096
DNS_CACHE_ANSWER_BYTES = 8192
DNS_CACHE_MAX_TTL = 3600


class _AnswerCache(dns.resolver.LRUCache):
    """dnspython's thread-safe LRU cache, keeping only answers of a bounded size and age.

    dnspython gives a negative answer without an SOA record (no TTL to go by) the
    longest TTL there is; RFC 2308 §5 says such an answer is not cached, and here it
    is not.  Every other answer is kept for its TTL, an hour at most.
    """

    def put(self, key: Any, value: dns.resolver.Answer) -> None:
        if _answer_size(value) > DNS_CACHE_ANSWER_BYTES:
            return
        if value.chaining_result.minimum_ttl >= dns.ttl.MAX_TTL:
            return
        value.expiration = min(value.expiration, time.time() + DNS_CACHE_MAX_TTL)
        super().put(key, value)


def _answer_size(answer: dns.resolver.Answer) -> int:
    rrset = answer.rrset
    if rrset is None:
        return 0
    return sum(len(rdata.to_wire()) for rdata in rrset)


@functools.lru_cache(maxsize=8)
def _resolver_for(settings: DnsSettings) -> dns.resolver.Resolver:
    """One caching resolver per DNS settings, shared by every check (queries do not change it).

    Built once, not per message: with no name servers configured that means
    reading /etc/resolv.conf once per process (a config reload with other
    settings builds a new one, with an empty cache).
    """
    if settings.nameservers:
        servers = [parse_nameserver(s) for s in settings.nameservers]
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [address for address, _ in servers]
        resolver.nameserver_ports = dict(servers)
    else:
        resolver = dns.resolver.Resolver()
    # Each attempt gets a share of the lookup's time, so a dead server leaves
    # time to ask the next one (or the same one again, once).
    resolver.timeout = settings.timeout / (len(resolver.nameservers) + 1)
    resolver.lifetime = settings.timeout
    resolver.cache = _AnswerCache(DNS_CACHE_ENTRIES)
    return resolver


def forget_dns_answers() -> None:
    """Drop every resolver and its cached answers (the next check builds them again)."""
    _resolver_for.cache_clear()


class _Dns:
    """dnspython with the configured servers; every query bounded by the check's deadline."""

    def __init__(self, settings: DnsSettings, deadline: float) -> None:
        self.settings = settings
        self.deadline = deadline
        self._resolver: dns.resolver.Resolver | None = None

    def _get_resolver(self) -> dns.resolver.Resolver:
        if self._resolver is None:
            self._resolver = _resolver_for(self.settings)
        return self._resolver

    def resolve(self, name: str, rdtype: str) -> list[Any]:
        """The records of name/rdtype; [] when the name or the type does not exist."""
        shown = f"{name.rstrip('.')} {rdtype}"  # for error messages
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DnsTempError(f"out of time before looking up {shown}")
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return []  # not a valid name: nothing can be published there
        try:
            answer = self._get_resolver().resolve(
                qname, rdtype, lifetime=min(self.settings.timeout, left),
                raise_on_no_answer=False, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            return []
        except dns.exception.Timeout:
            raise DnsTempError(f"DNS timeout looking up {shown}") from None
        except dns.resolver.NoNameservers:
            raise DnsTempError(f"no DNS server answered {shown}") from None
        except dns.exception.DNSException as exc:
            raise DnsTempError(f"DNS error looking up {shown}: {exc}") from None
        return list(answer.rrset) if answer.rrset is not None else []

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record's strings joined, as DNS-based policies read them."""
        return [b"".join(rdata.strings) for rdata in self.resolve(name, "TXT")]

    def spf_lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's DNSLookup contract: ((name, type), value) pairs, TempError when temporary."""
        try:
            records = self.resolve(name, qtype)
        except DnsTempError as exc:
            raise spf.TempError(str(exc)) from None
        pairs: list[tuple[tuple[str, str], Any]] = []
        for rdata in records:
            if qtype in ("A", "AAAA"):
                pairs.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                pairs.append(((name, qtype), (rdata.preference, rdata.exchange.to_text())))
            elif qtype == "PTR":
                pairs.append(((name, qtype), rdata.target.to_text(omit_final_dot=True)))
            elif qtype in ("TXT", "SPF"):
                pairs.append(((name, qtype), list(rdata.strings)))
        return pairs


class _KeyFetch:
    """dkimpy's dnsfunc for one signature, remembering what DNS said.

    dkimpy turns a missing key, an unusable key and a DNS timeout alike into
    verify() == False; what this saw tells them apart.
    """

    def __init__(self, dns_: _Dns) -> None:
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


# pyspf's own DNSLookup, for callers outside a check (see the module docstring).
_PYSPF_LOOKUP: Callable[..., Any] = spf.DNSLookup
_SPF_DNS: contextvars.ContextVar[_Dns | None] = contextvars.ContextVar(
    "mxrules_spf_dns", default=None)
_ROUTE_LOCK = threading.Lock()


def _spf_dnslookup(name: str, qtype: str, strict: Any = True,
                   timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
    resolver = _SPF_DNS.get()
    if resolver is None:
        result: list[tuple[tuple[str, str], Any]] = _PYSPF_LOOKUP(name, qtype, strict, timeout)
        return result
    return resolver.spf_lookup(name, qtype)


def _route_pyspf() -> None:
    if spf.DNSLookup is not _spf_dnslookup:
        with _ROUTE_LOCK:
            spf.DNSLookup = _spf_dnslookup


# --------------------------------------------------------------------------- the checks


def _check_spf(dns_: _Dns, client_ip: str, helo: str, mail_from: str) -> SpfResult:
    if not mail_from and not helo:
        return SpfResult("none", "mailfrom", "", "", "no identity to check")
    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        # Mail that did not come over TCP (a local submission) has no address to check.
        sender = mail_from or f"postmaster@{helo}"
        return SpfResult("none", "mailfrom" if mail_from else "helo", sender,
                         sender.rpartition("@")[2], "no client IP address")
    _route_pyspf()
    token = _SPF_DNS.set(dns_)
    try:
        query = spf.query(i=client_ip, s=mail_from, h=helo, timeout=dns_.settings.timeout)
        result, _code, _explanation = query.check()
    finally:
        _SPF_DNS.reset(token)
    identity: Literal["mailfrom", "helo"] = "helo" if query.ident == "helo" else "mailfrom"
    problem = str(getattr(query, "prob", "")) if result in ("temperror", "permerror") else ""
    if result not in SPF_STATUS:
        return SpfResult("permerror", identity, query.s, query.o, f"unknown result {result}")
    return SpfResult(result, identity, str(query.s), str(query.o or ""), problem)


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


def _check_dkim(path: str, head: Head, dns_: _Dns, *, complete: bool) -> list[DkimResult]:
    if head.complete and not _SIGNATURE_LINE.search(head.block):
        # Unsigned, whatever its size: GRAY, as SES says of a message not DKIM-signed
        # (a large unsigned message is common now that every message is checked).
        return []
    if not complete or not head.complete:
        # Over a size limit: the signatures in the headers read are reported, unverified.
        reason = "message over the size limit" if not complete else "header block over the limit"
        return [_dkim_entry(_signature_tags(v.encode("ascii", "surrogateescape")), "neutral",
                            reason, checked=False)
                for v in _header_values(head.block, "DKIM-Signature")
                ] or [DkimResult("neutral", reason=reason, checked=False)]
    bodies = BodyHashes(path, head.body_offset, dns_.deadline)
    try:
        verifier = Verifier(head.block, bodies, logger=_QuietLogger(),
                            timeout=dns_.settings.timeout)
    except Exception as exc:  # dkimpy's own parser refusing the message
        return [_dkim_entry(_signature_tags(v.encode("ascii", "surrogateescape")), "neutral",
                            f"message not parseable: {exc}")
                for v in _header_values(head.block, "DKIM-Signature")]
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


def _verify_one(verifier: Any, index: int, value: bytes, dns_: _Dns) -> DkimResult:
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


def _header_values(block: bytes, name: str) -> list[str]:
    headers = BytesHeaderParser(policy=compat32).parsebytes(block)
    return [str(v) for v in headers.get_all(name) or []]


def _check_dmarc(head: Head, dns_: _Dns, spf_result: SpfResult,
                 dkim_results: Sequence[DkimResult]) -> DmarcResult:
    if not head.complete:
        # A From header past the part read could make it two author domains.
        return DmarcResult("permerror", reason="header block over the limit")
    from_domain, why = author_domain(_header_values(head.block, "From"))
    if from_domain is None:
        return DmarcResult("permerror", reason=why)
    try:
        record, record_domain = _find_dmarc_record(dns_, from_domain)
    except DnsTempError as exc:
        return DmarcResult("temperror", from_domain, reason=str(exc))
    return evaluate_dmarc(from_domain, record, record_domain, spf_result, dkim_results)


def _find_dmarc_record(dns_: _Dns, from_domain: str) -> tuple[DmarcRecord | None, str]:
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


def _read_head(path: str) -> Head:
    """The message's header block (never its body) and its size."""
    with open(path, "rb") as fh:
        return read_head(fh)


def check(message_path: str, *, client_ip: str, helo: str, mail_from: str, authserv_id: str,
          dns: DnsSettings, timeout: float, max_size: int) -> AuthResult:
    """SPF, DKIM and DMARC for one message, within `timeout` seconds; never raises."""
    settings = dns  # the name is the API's; inside, `dns` is dnspython
    try:
        return _check(message_path, client_ip=client_ip, helo=helo, mail_from=mail_from,
                      authserv_id=authserv_id, settings=settings, timeout=timeout,
                      max_size=max_size)
    except Exception as exc:
        log.warning("auth check failed: %r", exc, exc_info=True)
        failed = Verdict("PROCESSING_FAILED", sanitize(f"internal error: {exc!r}"))
        spf_result = SpfResult("temperror", "mailfrom", mail_from, "", "internal error")
        return AuthResult(
            failed, failed, failed, None,
            received_spf(spf_result, client_ip=client_ip, helo=helo, mail_from=mail_from,
                         authserv_id=authserv_id),
            f"{ar_value(authserv_id)}; spf=temperror {comment('internal error')}; "
            "dkim=temperror; dmarc=temperror")


def _check(message_path: str, *, client_ip: str, helo: str, mail_from: str, authserv_id: str,
           settings: DnsSettings, timeout: float, max_size: int) -> AuthResult:
    # DNS gets the time less a reserve for the work after the last answer (verifying,
    # formatting), so a caller that waits exactly `timeout` still gets this result.
    dns_ = _Dns(settings, time.monotonic() + timeout - min(0.5, timeout / 10))
    try:
        spf_result = _check_spf(dns_, client_ip, helo, mail_from)
    except Exception as exc:  # pyspf on input it did not expect
        log.warning("SPF check failed: %r", exc, exc_info=True)
        spf_result = SpfResult("temperror", "mailfrom", mail_from, "", f"internal error: {exc}")

    try:
        head = _read_head(message_path)
    except OSError as exc:
        # Without the message neither DKIM nor DMARC can be decided; SPF stands.
        why = f"message not readable: {exc.strerror or exc}"
        dkim_results = [DkimResult("neutral", reason=why, checked=False)]
        dkim_status = Verdict("PROCESSING_FAILED", sanitize(why))
        dmarc_result = DmarcResult("temperror", reason=why)
    else:
        complete = head.size <= max_size
        try:
            dkim_results = _check_dkim(message_path, head, dns_, complete=complete)
        except Exception as exc:
            log.warning("DKIM check failed: %r", exc, exc_info=True)
            dkim_results = [DkimResult("neutral", reason=f"internal error: {exc}",
                                       checked=False)]
        dkim_status = dkim_verdict(dkim_results)
        if not complete and dkim_results:
            dkim_status = Verdict("PROCESSING_FAILED", "over the size limit")
        try:
            dmarc_result = _check_dmarc(head, dns_, spf_result, dkim_results)
        except Exception as exc:
            log.warning("DMARC check failed: %r", exc, exc_info=True)
            dmarc_result = DmarcResult("temperror", reason=f"internal error: {exc}")
    dmarc_status, policy = dmarc_verdict(dmarc_result)

    return AuthResult(
        spf=spf_verdict(spf_result),
        dkim=dkim_status,
        dmarc=dmarc_status,
        dmarc_policy=policy,
        received_spf=received_spf(spf_result, client_ip=client_ip, helo=helo,
                                  mail_from=mail_from, authserv_id=authserv_id),
        authentication_results=authentication_results(authserv_id, spf_result, dkim_results,
                                                      dmarc_result),
    )
