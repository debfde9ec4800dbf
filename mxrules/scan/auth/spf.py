"""SPF (RFC 7208) through pyspf, its DNS routed through the check's resolver."""

from __future__ import annotations

import contextvars
import ipaddress
import threading
from collections.abc import Callable
from typing import Any, Literal

import spf

from mxrules.scan import Status, Verdict

from .headers import sanitize
from .resolver import Dns
from .results import SpfResult

SPF_STATUS: dict[str, Status] = {
    "pass": "PASS",
    "fail": "FAIL",
    "softfail": "GRAY",
    "neutral": "GRAY",
    "none": "GRAY",
    "temperror": "PROCESSING_FAILED",
    "permerror": "PROCESSING_FAILED",
}


def spf_verdict(spf_result: SpfResult) -> Verdict:
    detail: str = spf_result.result
    if spf_result.problem:
        detail += f": {sanitize(spf_result.problem)}"
    return Verdict(SPF_STATUS[spf_result.result], detail)



_PYSPF_LOOKUP: Callable[..., Any] = spf.DNSLookup
_SPF_DNS: contextvars.ContextVar[Dns | None] = contextvars.ContextVar(
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



def check_spf(dns_: Dns, client_ip: str, helo: str, mail_from: str) -> SpfResult:
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
