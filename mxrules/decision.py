"""The pure decision core: client, envelope and TLS facts in, verdicts out.

It imports neither pymilter nor boto3: the milter adapter and `mxrules
explain` both ask the same `Engine`, so a dry run says exactly what the live
milter would do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from . import actionspec
from .ipfilter import FilterDecision, IPAddress, IpFilterTable, parse_cidr
from .matching import ManagedDomains, RecipientIndex, bare, split_address
from .rules import BounceAction, Rule, RuleSet, StopAction

if TYPE_CHECKING:
    from .config import Config

Verb = Literal["continue", "reject", "tempfail"]


@dataclass(frozen=True)
class Reply:
    """What the milter tells Postfix: go on, or an SMTP reply to give."""

    verb: Verb
    code: str = "250"
    xcode: str = "2.0.0"
    text: str = ""

    def __str__(self) -> str:
        return f"{self.code} {self.xcode} {self.text}".rstrip()


CONTINUE = Reply("continue")
TEMPFAIL_INTERNAL = Reply("tempfail", "451", "4.3.0", "Temporary local problem, try again later")
TEMPFAIL_SPOOL = Reply(
    "tempfail", "451", "4.3.0", "Temporary failure storing the message, try again later"
)
TEMPFAIL_SCAN = Reply(
    "tempfail", "451", "4.7.0", "Temporary failure scanning the message, try again later"
)
TOO_BIG = Reply("reject", "552", "5.3.4", "Message size exceeds fixed maximum message size")
# A forwarded message whose original client cannot be named (forwarder_unresolved).
UNRESOLVED_REPLIES = {
    "tempfail": Reply("tempfail", "451", "4.7.1",
                      "Original client of forwarded message unknown, try again later"),
    "reject": Reply("reject", "554", "5.7.1", "Original client of forwarded message unknown"),
}
# Every recipient's rules would bounce it (SES's S3 and SNS limits): refused at end of data.
TOO_BIG_FOR_ACTIONS = Reply(
    "reject", "552", "5.3.4", "Message size exceeds the limit of the receipt rules' actions"
)


@dataclass(frozen=True)
class ConnectDecision:
    client: str
    filters: FilterDecision
    reply: Reply


@dataclass(frozen=True)
class RcptDecision:
    """The fate of one envelope recipient."""

    recipient: str
    outcome: Literal["unmanaged", "accepted", "no-rule", "no-rule-set", "tls-required",
                     "bounced", "too-big"]
    rules: tuple[str, ...]  # names of the matching enabled rules, in rule-set order
    reply: Reply

    @property
    def handled(self) -> bool:
        """True when mxrules takes the recipient (its rules' actions will run)."""
        return self.outcome == "accepted"


@dataclass(frozen=True)
class RulePlan:
    """One matched rule and the envelope recipients it matched."""

    rule: Rule
    recipients: tuple[str, ...]


class Engine:
    """A config compiled for fast decisions.  Immutable: a reload builds a new one."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.filters = IpFilterTable(config.ip_filters, config.blocklist)
        self.domains = ManagedDomains(config.domains)
        # parse_cidr, as the config check does: an IPv4-mapped CIDR must match the
        # IPv4 client address parse_ip gives.
        self.trusted = [parse_cidr(c) for c in config.trusted_forwarders]
        self.rule_set: RuleSet | None = (
            config.rule_sets.get(config.active_rule_set) if config.active_rule_set else None
        )
        rules = self.rule_set.rules if self.rule_set else ()
        self.index = RecipientIndex(rules, case_sensitive_local=config.local_part_case_sensitive)
        # With delivery: deliver, Postfix delivers a handled recipient too: refusing it
        # would take that delivery away, so only consume answers bounces at RCPT.
        self.bounce_at_rcpt = config.bounce_reject_at_rcpt and config.delivery == "consume"
        self.bounce_sizes = {rule.name: bounce_size(rule) for rule in rules}

    # -- connect ---------------------------------------------------------
    def is_trusted_forwarder(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.trusted)

    def connect(self, addr: IPAddress) -> ConnectDecision:
        decision = self.filters.decide(addr)
        if decision.allowed:
            return ConnectDecision(str(addr), decision, CONTINUE)
        text = (
            f"Client host [{addr}] blocked using local blocklist"
            if decision.reason == "blocklist"
            else f"Client host [{addr}] blocked by IP address filter"
        )
        return ConnectDecision(str(addr), decision, Reply("reject", "554", "5.7.1", text))

    # -- MAIL FROM -------------------------------------------------------
    def mail(self, size: int | None) -> Reply:
        if size is not None and size > self.config.max_message_size:
            return TOO_BIG
        return CONTINUE

    # -- RCPT TO ---------------------------------------------------------
    def rcpt(self, recipient: str, *, tls: bool, forwarded: bool = False,
             size: int | None = None) -> RcptDecision:
        """The fate of one recipient; `forwarded`: the client is a trusted forwarder.

        A trusted forwarder has already accepted the message: a refusal would make
        it send the DSN, to whatever sender the mail claims, so its recipients are
        never refused for a Bounce (the worker's checks apply to them instead), nor
        for size.  `size`, when known, is the smallest the stored copy can be: the
        SMTP client's SIZE= plus the fewest bytes SES's headers add; a recipient
        every one of whose rules would bounce that is refused now, in the
        conversation, instead of with a DSN later.
        """
        parts = split_address(recipient)
        if parts is None or parts[1] not in self.domains:
            return RcptDecision(recipient, "unmanaged", (), CONTINUE)
        if self.rule_set is None:
            reply = Reply(
                "reject", "550", "5.1.1", f"<{bare(recipient)}>: Recipient address rejected: "
                "no active rule set",
            )
            return RcptDecision(recipient, "no-rule-set", (), reply)
        rules = [self.rule_set.rules[i] for i in self.index.match(recipient)]
        names = tuple(r.name for r in rules)
        if not rules:
            reply = Reply(
                "reject", "550", "5.1.1", f"<{bare(recipient)}>: Recipient address rejected: "
                "User unknown",
            )
            return RcptDecision(recipient, "no-rule", (), reply)
        if not tls and any(r.tls_policy == "Require" for r in rules):
            reply = Reply("reject", "530", "5.7.0", "Must issue a STARTTLS command first")
            return RcptDecision(recipient, "tls-required", names, reply)
        bounce = rcpt_bounce(rules) if self.bounce_at_rcpt and not forwarded else None
        if bounce is not None:
            return RcptDecision(recipient, "bounced", names, bounce_reply(bounce))
        # With `delivery: deliver` Postfix delivers the message too: never refused for size.
        limit = (self.size_limit(names) if self.config.delivery == "consume" and not forwarded
                 else None)
        if size is not None and limit is not None and size > limit:
            # 550, not 552: Postfix's and other clients read 552 after RCPT as 452 (RFC
            # 5321 4.5.3.1.10) and would retry for days a message that can never fit.
            reply = Reply("reject", "550", "5.3.4", f"<{bare(recipient)}>: Recipient address "
                          f"rejected: message size exceeds the limit of {limit} bytes")
            return RcptDecision(recipient, "too-big", names, reply)
        return RcptDecision(recipient, "accepted", names, CONTINUE)

    def size_limit(self, rules: Sequence[str]) -> int | None:
        """The size above which every rule named bounces the message; None if one never does."""
        sizes = [self.bounce_sizes.get(name) for name in rules]
        if not sizes or None in sizes:
            return None
        return max(size for size in sizes if size is not None)

    def too_big(self, decisions: Sequence[RcptDecision], size: int) -> bool:
        """True when every recipient of the message is handled and all of their rules bounce
        a stored copy of `size` bytes: the message can be refused at end of data.

        An unmanaged recipient, or `delivery: deliver` (Postfix delivers the message
        too), keeps it: that delivery must not be refused for the actions' sake.
        """
        if self.config.delivery != "consume" or not decisions:
            return False
        for d in decisions:
            if not d.handled:
                if d.reply.verb == "continue":  # unmanaged: Postfix delivers it
                    return False
                continue  # refused at RCPT: not part of the message
            limit = self.size_limit(d.rules)
            if limit is None or size <= limit:
                return False
        return any(d.handled for d in decisions)

    # -- the message -----------------------------------------------------
    def plan(self, accepted: Sequence[RcptDecision]) -> list[RulePlan]:
        """Every matched rule, in rule-set order, with the recipients it matched."""
        if self.rule_set is None:
            return []
        matched: dict[str, list[str]] = {}
        for decision in accepted:
            if decision.handled:
                for name in decision.rules:
                    matched.setdefault(name, []).append(decision.recipient)
        return [
            RulePlan(rule, tuple(matched[rule.name]))
            for rule in self.rule_set.rules
            if rule.name in matched
        ]

    def scan_wanted(self, plan: Sequence[RulePlan]) -> bool:
        """Spam and virus scans: only when a matched rule has scan_enabled (SES)."""
        return any(p.rule.scan_enabled for p in plan)

    def auth_wanted(self, plan: Sequence[RulePlan]) -> bool:
        """SPF, DKIM and DMARC: SES runs them on every message; `scan.authentication`
        may narrow that to scanning rules, or turn them off."""
        mode = self.config.scan.authentication
        if mode == "always":
            return bool(plan)
        return mode == "scan_enabled" and self.scan_wanted(plan)


def in_stream_headers(plan: Sequence[RulePlan]) -> list[tuple[str, str]]:
    """The AddHeader actions the milter can apply before Postfix's 250.

    Actions run in rule-set order.  A Stop ends everything after it; a
    RequestResponse Lambda may stop the rule or the rule set, which is known
    only once it answers (in the worker), so the in-stream copy gets only the
    headers that precede it (docs/ses-compatibility.md, "AddHeader").
    """
    headers: list[tuple[str, str]] = []
    for item in plan:
        for action in item.rule.actions:
            header = actionspec.in_stream_header(action)
            if header is not None:
                headers.append(header)
            elif actionspec.may_stop(action):
                return headers
    return headers


def rcpt_bounce(rules: Sequence[Rule]) -> BounceAction | None:
    """The Bounce to answer at RCPT, if bouncing is all a recipient's rules would do.

    `rules` are the recipient's matched rules in rule-set order.  Refusing the
    recipient instead of accepting it and sending a DSN later changes nothing
    else only when every action that would run for it, up to a Stop or the last
    rule, is a Bounce or a Stop, none with a topic_arn (its notification needs
    the message), and the first is a Bounce with a 5xx reply code.  A 4xx
    Bounce is left to the worker: refused with 4xx, the client would retry for
    days a message that can never be taken.
    """
    first: BounceAction | None = None
    for rule in rules:
        for action in rule.actions:
            if action.topic_arn is not None:
                return None
            if isinstance(action, StopAction):
                return first
            if not isinstance(action, BounceAction):
                return None
            if first is None:
                if not action.smtp_reply_code.startswith("5"):
                    return None
                first = action
    return first


def bounce_reply(action: BounceAction) -> Reply:
    """The RCPT reply for a Bounce: its reply code, status code and message.

    Postfix refuses a milter reply whose enhanced status is of another class
    than its code, so a status that does not start with 5 becomes 5.0.0; the
    text is made one line of printable ASCII, short enough for any client.
    """
    status = action.status_code or ""
    if not re.fullmatch(r"5\.[0-9]{1,3}\.[0-9]{1,3}", status):
        status = "5.0.0"
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in " ".join(action.message.split()))
    return Reply("reject", action.smtp_reply_code, status, text[:_REPLY_TEXT] or "Rejected")


# An SMTP reply line is at most 512 octets (RFC 5321 §4.5.3.1.5) with its code and status.
_REPLY_TEXT = 400


def bounce_size(rule: Rule) -> int | None:
    """The stored-copy size above which `rule` surely bounces the message, or None.

    SES bounces an email an S3 or SNS action cannot take (Action.EMAIL_LIMIT,
    headers included).  The size counted is the message plus SES's prepended
    headers; the AddHeaders the rule runs before the action are taken off its
    limit.  Only actions reached whatever happens count: none after a Stop or a
    RequestResponse Lambda (whose answer may end the rule first).
    """
    added = 0
    limits: list[int] = []
    for action in rule.actions:
        header = actionspec.in_stream_header(action)
        if header is not None:
            added += len(f"{header[0]}: {header[1]}\r\n".encode())
        elif action.EMAIL_LIMIT is not None:
            limits.append(action.EMAIL_LIMIT - added)
        elif actionspec.may_stop(action):
            break
    return min(limits) if limits else None
