"""IP address filters: SES's Allow/Block filters plus mxrules' blocklists.

Order of checks (docs/ses-compatibility.md, "IP address filters"): the blocklist files, then the
user's Block filters -- but an address matched by any Allow filter is accepted
whatever else matches ("Allow wins").

Lookups are longest-prefix matches done as one dict probe per distinct prefix
length present (at most 33 for IPv4, 129 for IPv6), so the cost does not grow
with the number of CIDRs: 100,000 blocklist entries cost the same as ten.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import ConfigError, ConfigProblem
from .rules import IpFilter

T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress:
    """An address as Postfix or a person writes it; IPv4-mapped IPv6 becomes IPv4."""
    text = text.strip()
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_cidr(text: str) -> IPNetwork:
    """One address or a CIDR block.

    Host bits are allowed and dropped: SES's own documentation gives
    `10.0.0.1/24` as an example, and SES exports must load as they are.
    """
    net = ipaddress.ip_network(text.strip(), strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        mapped = net.network_address.ipv4_mapped
        return ipaddress.IPv4Network(f"{mapped}/{max(net.prefixlen - 96, 0)}")
    return net


class PrefixTable(Generic[T]):
    """Longest-prefix match over IPv4 and IPv6 networks."""

    def __init__(self) -> None:
        # family bits -> prefix length -> network number >> (bits - length) -> (net, value)
        self._tables: dict[int, dict[int, dict[int, tuple[IPNetwork, T]]]] = {32: {}, 128: {}}
        self._lengths: dict[int, list[int]] = {32: [], 128: []}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, net: IPNetwork, value: T) -> None:
        bits = net.max_prefixlen
        by_len = self._tables[bits].setdefault(net.prefixlen, {})
        key = int(net.network_address) >> (bits - net.prefixlen)
        if key not in by_len:  # the first entry for a network keeps its name
            by_len[key] = (net, value)
            self._count += 1
        self._lengths[bits] = sorted(self._tables[bits], reverse=True)

    def lookup(self, addr: IPAddress) -> tuple[IPNetwork, T] | None:
        bits = addr.max_prefixlen
        number = int(addr)
        tables = self._tables[bits]
        for length in self._lengths[bits]:
            hit = tables[length].get(number >> (bits - length))
            if hit is not None:
                return hit
        return None


@dataclass(frozen=True)
class FilterDecision:
    """Why a client address was accepted or refused at connect time."""

    allowed: bool
    reason: str  # "allow-filter" | "blocklist" | "block-filter" | "no-match" | "trusted-forwarder"
    name: str | None = None  # filter name, or "file:line" of a blocklist entry
    cidr: str | None = None

    def describe(self) -> str:
        if self.reason == "no-match":
            return "no IP filter or blocklist matches"
        if self.reason == "trusted-forwarder":
            return "a trusted forwarder (trusted_forwarders)"
        what = {
            "allow-filter": "Allow filter",
            "blocklist": "blocklist entry",
            "block-filter": "Block filter",
        }[self.reason]
        return f"{what} {self.name} ({self.cidr})"


class IpFilterTable:
    """The compiled filters of one config."""

    def __init__(
        self,
        filters: Iterable[IpFilter] = (),
        blocklist: Iterable[tuple[IPNetwork, str]] = (),
    ) -> None:
        self.allow: PrefixTable[str] = PrefixTable()
        self.block: PrefixTable[str] = PrefixTable()
        self.blocklist: PrefixTable[str] = PrefixTable()
        for f in filters:
            table = self.allow if f.policy == "Allow" else self.block
            table.add(parse_cidr(f.cidr), f.name)
        for net, label in blocklist:
            self.blocklist.add(net, label)

    def decide(self, addr: IPAddress) -> FilterDecision:
        hit = self.allow.lookup(addr)
        if hit:
            return FilterDecision(True, "allow-filter", hit[1], str(hit[0]))
        hit = self.blocklist.lookup(addr)
        if hit:
            return FilterDecision(False, "blocklist", hit[1], str(hit[0]))
        hit = self.block.lookup(addr)
        if hit:
            return FilterDecision(False, "block-filter", hit[1], str(hit[0]))
        return FilterDecision(True, "no-match")


def load_blocklist(path: str, text: str | None = None) -> list[tuple[IPNetwork, str]]:
    """Read a blocklist file: one address or CIDR per line, `#` starts a comment.

    Every bad line is reported (file:line), not just the first.
    """
    if text is None:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as exc:
            problem = ConfigProblem(path, "", f"cannot read blocklist: {exc.strerror}")
            raise ConfigError([problem]) from None
    entries: list[tuple[IPNetwork, str]] = []
    problems: list[ConfigProblem] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            entries.append((parse_cidr(entry), f"{path}:{lineno}"))
        except ValueError as exc:
            problems.append(ConfigProblem(f"{path}:{lineno}", "", f"not an address or CIDR: {exc}"))
    if problems:
        raise ConfigError(problems)
    return entries
