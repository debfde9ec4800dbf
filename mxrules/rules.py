"""The receipt-rule model: rule sets, rules, actions and IP filters.

Plain frozen dataclasses, the same whether a rule came from mxrules' YAML
(SES field names in snake_case) or from an SES JSON export (CamelCase).  A job
in the spool carries a snapshot of its matched rules in the YAML form
(`to_config`), so the rule set in force at accept governs every later action.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# The action model and its registry live in actionspec; re-exported for the rule model's users.
from .actionspec import (  # noqa: F401
    ACTION_TYPES,
    S3_EMAIL_LIMIT,
    SNS_EMAIL_LIMIT,
    Action,
    AddHeaderAction,
    BounceAction,
    LambdaAction,
    S3Action,
    SNSAction,
    StopAction,
    action_from_config,
    camel,
)
from .configschema import default

TlsPolicy = Literal["Require", "Optional"]

@dataclass(frozen=True)
class Rule:
    name: str
    enabled: bool = default("$defs.rule.enabled")  # SES's: a rule runs only when switched on
    recipients: tuple[str, ...] = ()
    tls_policy: TlsPolicy = default("$defs.rule.tls_policy")
    scan_enabled: bool = default("$defs.rule.scan_enabled")
    actions: tuple[Action, ...] = ()

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "enabled": self.enabled,
            "recipients": list(self.recipients),
            "tls_policy": self.tls_policy,
            "scan_enabled": self.scan_enabled,
            "actions": [a.to_config() for a in self.actions],
        }

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> Rule:
        return cls(
            name=raw["name"],
            enabled=bool(raw.get("enabled", cls.enabled)),
            recipients=tuple(raw.get("recipients") or ()),
            tls_policy=raw.get("tls_policy", cls.tls_policy),
            scan_enabled=bool(raw.get("scan_enabled", cls.scan_enabled)),
            actions=tuple(action_from_config(a) for a in raw.get("actions") or ()),
        )


@dataclass(frozen=True)
class RuleSet:
    name: str
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class IpFilter:
    name: str
    policy: Literal["Allow", "Block"]
    cidr: str


@dataclass(frozen=True)
class Limits:
    """SES's limits, enforced as config errors; raisable for a self-hosted MX."""

    rules_per_rule_set: int = default("limits.rules_per_rule_set")
    recipients_per_rule: int = default("limits.recipients_per_rule")
    actions_per_rule: int = default("limits.actions_per_rule")
    ip_filters: int = default("limits.ip_filters")
