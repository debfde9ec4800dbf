"""`mxrules explain`: a dry run of one SMTP transaction against the config.

It asks the same `Engine` the milter asks, so what it prints is what the live
milter would do: which filter decided the connection, which rules matched
each recipient, the replies Postfix would give, and the actions that would
run, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import actionspec, forwarded
from .decision import Engine, RcptDecision, RulePlan, in_stream_headers
from .ipfilter import parse_ip
from .matching import bare
from .rules import Action


@dataclass(frozen=True)
class Transaction:
    client_ip: str
    sender: str
    recipients: tuple[str, ...]
    helo: str = ""
    tls: bool = False
    size: int | None = None


def describe_action(action: Action) -> str:
    return actionspec.describe(action)


def explain(engine: Engine, tx: Transaction) -> dict[str, Any]:
    """The whole dry run as plain data (what `--json` prints)."""
    cfg = engine.config
    out: dict[str, Any] = {
        "config": cfg.path,
        "active_rule_set": cfg.active_rule_set,
        "client": {"ip": tx.client_ip, "helo": tx.helo, "tls": tx.tls},
    }
    addr = parse_ip(tx.client_ip)
    # A trusted forwarder itself is not filtered; the original client it names
    # in its Received: header is, once the headers are in.
    conn = forwarded.connect(engine, addr)
    trusted = forwarded.is_forwarder(conn)
    out["connect"] = {
        "result": "accept" if conn.reply.verb == "continue" else "reject",
        "decided_by": conn.filters.reason,
        "filter": conn.filters.name,
        "cidr": conn.filters.cidr,
        "why": conn.filters.describe(),
        "reply": None if conn.reply.verb == "continue" else str(conn.reply),
        "trusted_forwarder": trusted,
    }
    if conn.reply.verb != "continue":
        return out
    mail = engine.mail(tx.size)
    out["mail"] = {"sender": tx.sender, "size": tx.size,
                   "reply": None if mail.verb == "continue" else str(mail)}
    if mail.verb != "continue":
        return out
    decisions: list[RcptDecision] = [engine.rcpt(r, tls=tx.tls, forwarded=trusted, size=tx.size)
                                     for r in tx.recipients]
    out["recipients"] = [
        {"recipient": d.recipient, "outcome": d.outcome, "rules": list(d.rules),
         "reply": None if d.reply.verb == "continue" else str(d.reply)}
        for d in decisions
    ]
    plan: list[RulePlan] = engine.plan(decisions)
    out["plan"] = [
        {"rule": p.rule.name, "recipients": list(p.recipients), "scan": p.rule.scan_enabled,
         "actions": [{"type": a.TYPE, "describe": describe_action(a), **a.to_config()}
                     for a in p.rule.actions]}
        for p in plan
    ]
    out["scans"] = engine.scan_wanted(plan)
    out["authentication"] = engine.auth_wanted(plan)
    sc = cfg.scan
    out["checks"] = [] if not out["scans"] else [
        f"spam: {sc.spam.engine} at {sc.spam.address}" if sc.spam
        else "spam: no scanner configured (PROCESSING_FAILED)",
        f"virus: {sc.virus.engine} at {sc.virus.address}" if sc.virus
        else "virus: no scanner configured (PROCESSING_FAILED)",
    ]
    if out["authentication"]:
        out["checks"].append(
            "SPF, DKIM, DMARC: DNS " + (", ".join(sc.nameservers) or "the system resolver"))
    elif out["scans"]:
        out["checks"].append(f"SPF, DKIM, DMARC: DISABLED (scan.authentication: "
                             f"{sc.authentication})")
    out["scan_timeout"] = sc.timeout
    out["in_stream_headers"] = [list(h) for h in in_stream_headers(plan)]
    handled = [d for d in decisions if d.handled]
    others = [d for d in decisions if d.outcome == "unmanaged"]
    if not handled:
        delivery = "not spooled: no recipient is handled by mxrules"
    elif cfg.delivery == "deliver":
        delivery = "deliver: spooled, and Postfix also delivers its copy as usual"
    elif others:
        delivery = ("consume: spooled; handled recipients removed from Postfix's copy, "
                    "which goes on for the others")
    else:
        delivery = "consume: spooled; Postfix's copy is discarded"
    out["delivery"] = delivery
    return out


def cfg_timeout(result: dict[str, Any]) -> str:
    return f"{result['scan_timeout']:g} s"


def render(result: dict[str, Any]) -> str:
    """The dry run for a person."""
    lines: list[str] = []
    c = result["client"]
    lines.append(f"config {result['config']}, active rule set: "
                 f"{result['active_rule_set'] or '(none: every managed recipient is rejected)'}")
    lines.append("")
    tls = "yes" if c["tls"] else "no"
    lines.append(f"CONNECT from [{c['ip']}]" + (f" HELO {c['helo']}" if c["helo"] else "")
                 + f" TLS {tls}")
    conn = result["connect"]
    if conn["trusted_forwarder"]:
        lines.append("  a trusted forwarder: not filtered itself; the original client named in "
                     "its Received: header is filtered at end of data (or send it with XCLIENT); "
                     "a message naming none gets forwarder_unresolved's answer")
    if conn["result"] == "reject":
        lines.append(f"  REJECT {conn['reply']}")
        lines.append(f"  decided by: {conn['why']}")
        return "\n".join(lines)
    lines.append(f"  accept: {conn['why']}")
    mail = result["mail"]
    lines.append(f"MAIL FROM:<{mail['sender']}>" + (f" SIZE={mail['size']}" if mail["size"]
                                                    else ""))
    if mail["reply"]:
        lines.append(f"  REJECT {mail['reply']}")
        return "\n".join(lines)
    lines.append("  accept")
    for r in result["recipients"]:
        lines.append(f"RCPT TO:<{bare(r['recipient'])}>")
        if r["outcome"] == "unmanaged":
            lines.append("  not a managed domain: left to Postfix, untouched")
        elif r["outcome"] == "accepted":
            lines.append(f"  accept: matched by {', '.join(r['rules'])}")
        else:
            lines.append(f"  REJECT {r['reply']}")
            why = {
                "no-rule": "no enabled rule of the active rule set matches it",
                "no-rule-set": "there is no active rule set",
                "tls-required": f"rule {', '.join(r['rules'])} requires TLS (tls_policy: "
                                "Require) and this session is not encrypted",
                "bounced": f"a Bounce is all that {', '.join(r['rules'])} would do for it: "
                           "refused now instead of accepted and bounced later, so no "
                           "delivery status notification is sent",
            }[r["outcome"]]
            lines.append(f"  because {why}")
    lines.append("")
    if not result["plan"]:
        lines.append("No rule runs.")
    else:
        lines.append("Actions, in the order they run:")
        for p in result["plan"]:
            scan = ", scans on" if p["scan"] else ""
            lines.append(f"  rule {p['rule']} (recipients: {', '.join(p['recipients'])}{scan})")
            if not p["actions"]:
                lines.append("    (no actions)")
            for i, a in enumerate(p["actions"], 1):
                lines.append(f"    {i}. {a['describe']}")
    if result["in_stream_headers"]:
        added = ", ".join(f"{n}: {v}" for n, v in result["in_stream_headers"])
        lines.append(f"Headers added to Postfix's copy at end of data: {added}")
    if result["scans"]:
        lines.append(f"Scans (a matched rule has scan_enabled), within {cfg_timeout(result)}:")
    elif result["authentication"]:
        lines.append("Scans: SPF, DKIM, DMARC only (spam and virus DISABLED: no matched rule "
                     f"has scan_enabled), within {cfg_timeout(result)}:")
    else:
        lines.append("Scans: no (no matched rule has scan_enabled; verdicts DISABLED)")
    lines += [f"  {c}" for c in result["checks"]]
    lines.append(f"Delivery: {result['delivery']}")
    return "\n".join(lines)
