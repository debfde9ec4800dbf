"""DNS for the checks: one resolver per settings with a bounded answer cache, and a
per-check deadline.

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

- dkimpy: `DKIM.verify(dnsfunc=...)`, a per-call hook (`dkim._KeyFetch`).
- DMARC: the resolver directly.
- pyspf has no per-query hook: `spf.query.dns()` calls the module function
  `spf.DNSLookup`. A check replaces that function by a dispatcher (once; again only
  if something else replaced it since) that reads the resolver of the check running in
  the current thread from a `ContextVar`; with no check running it calls pyspf's own
  function, so other users of pyspf in the process see no change. This is the one
  global mxrules touches, and it holds no per-message state.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.name
import dns.resolver
import dns.ttl
import spf

from mxrules.configschema import default
from mxrules.errors import MxrulesError
from mxrules.hostport import split_host_port


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
    try:
        host, number = split_host_port(text, default_port=53, bare_ipv6=True)
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"bad name server {text!r}: want ip or ip:port ({exc})") from None
    return str(address), number



class DnsTempError(MxrulesError):
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


class Dns:
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
