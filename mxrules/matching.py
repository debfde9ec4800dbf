"""Recipient matching (docs/ses-compatibility.md, "Recipient matching") and managed domains.

A condition is a full address (`user@example.com`, which also matches
`user+anything@example.com`), a domain (`example.com`, that domain exactly) or
a leading-dot domain (`.example.com`, any subdomain of it).  Conditions are
indexed by address, by domain and by parent domain, so a lookup costs a few
dict probes however many rules and recipients the rule set has.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .rules import Rule


def bare(address: str) -> str:
    """An envelope address without the spaces around it and its one pair of `<>`.

    The one rule wherever mxrules compares, logs or stores an address (the milter's
    MAIL and RCPT, matching, SMTP replies, the stored `returnPath`).  The milter's
    recipient deletion is the exception, on purpose: it must give Postfix back the
    very text smtpd parsed (`milter.session`, spaces included).
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def split_address(address: str) -> tuple[str, str] | None:
    """`<User@Example.COM>` -> ("User", "example.com"); None if there is no domain.

    The last `@` separates the domain, since a quoted local part may hold one.
    """
    local, sep, domain = bare(address).rpartition("@")
    if not sep or not local or not domain:
        return None
    return local, domain.rstrip(".").lower()


def parent_domains(domain: str) -> Iterable[str]:
    """`a.b.example.com` -> `b.example.com`, `example.com`, `com`."""
    rest = domain
    while "." in rest:
        rest = rest.split(".", 1)[1]
        yield rest


class ManagedDomains:
    """The domains mxrules answers for; everything else is left to Postfix."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.below: set[str] = set()  # `.example.com` entries, without the dot
        for entry in entries:
            entry = entry.lower().rstrip(".")
            if entry.startswith("."):
                self.below.add(entry[1:])
            else:
                self.exact.add(entry)

    def __contains__(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        if domain in self.exact:
            return True
        return any(parent in self.below for parent in parent_domains(domain))

    def __bool__(self) -> bool:
        return bool(self.exact or self.below)

    def entries(self) -> list[str]:
        return sorted(self.exact) + sorted("." + d for d in self.below)


def condition_domain(condition: str) -> str:
    """The domain part a recipient condition is about (leading dot kept)."""
    return condition.rpartition("@")[2].lower().rstrip(".")


class RecipientIndex:
    """Which enabled rules of a rule set match a recipient, in rule-set order."""

    def __init__(self, rules: Sequence[Rule], *, case_sensitive_local: bool = False) -> None:
        self.case_sensitive_local = case_sensitive_local
        self.by_address: dict[str, list[int]] = {}
        self.by_domain: dict[str, list[int]] = {}
        self.by_parent: dict[str, list[int]] = {}
        self.every: list[int] = []
        for position, rule in enumerate(rules):
            if not rule.enabled:
                continue
            if not rule.recipients:
                self.every.append(position)
            for condition in rule.recipients:
                self._add(condition, position)

    def _fold(self, local: str) -> str:
        return local if self.case_sensitive_local else local.lower()

    def _add(self, condition: str, position: int) -> None:
        if "@" in condition:
            local, _, domain = condition.rpartition("@")
            key = f"{self._fold(local)}@{domain.lower().rstrip('.')}"
            bucket = self.by_address.setdefault(key, [])
        elif condition.startswith("."):
            bucket = self.by_parent.setdefault(condition[1:].lower().rstrip("."), [])
        else:
            bucket = self.by_domain.setdefault(condition.lower().rstrip("."), [])
        if position not in bucket:
            bucket.append(position)

    def match(self, recipient: str) -> list[int]:
        """Positions (in the rule set) of the enabled rules matching `recipient`."""
        parts = split_address(recipient)
        if parts is None:
            return []
        local, domain = parts
        local = self._fold(local)
        hits: set[int] = set(self.every)
        hits.update(self.by_address.get(f"{local}@{domain}", ()))
        base, plus, _ = local.partition("+")
        if plus and base:
            hits.update(self.by_address.get(f"{base}@{domain}", ()))
        hits.update(self.by_domain.get(domain, ()))
        for parent in parent_domains(domain):
            hits.update(self.by_parent.get(parent, ()))
        return sorted(hits)
