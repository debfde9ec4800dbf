"""The receipt-rule model: rule sets, rules, actions and IP filters.

Plain frozen dataclasses, the same whether a rule came from mxrules' YAML
(SES field names in snake_case) or from an SES JSON export (CamelCase).  A job
in the spool carries a snapshot of its matched rules in the YAML form
(`to_config`), so the rule set in force at accept governs every later action.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .configschema import default

TlsPolicy = Literal["Require", "Optional"]

# SES's limits on the email an action takes, SES's prepended headers included.  S3:
# "the maximum email size (including headers) is 40 MB. Emails larger than that
# bounces." (SES API reference, S3Action; receiving-email-action-s3.md).  SNS: "the
# maximum email size (including headers) is 150 KB. Larger emails will bounce."
# (receiving-email-action-sns.md, quotas.md); the notification itself may be larger.
S3_EMAIL_LIMIT = 40 * 1024 * 1024
SNS_EMAIL_LIMIT = 150 * 1024


def camel(snake: str) -> str:
    """`bucket_name` -> `BucketName`: SES's API spelling of a field."""
    return "".join(part.capitalize() for part in snake.split("_"))


@dataclass(frozen=True)
class Action:
    """Base of every action; subclasses name their YAML key and SES type."""

    KEY: ClassVar[str]  # YAML key: `- s3: {...}`
    TYPE: ClassVar[str]  # SES `receipt.action.type`
    # SES's limit on the email (with the headers SES prepends) this action can take;
    # larger emails bounce.  None: no limit of the action's own.
    EMAIL_LIMIT: ClassVar[int | None] = None
    topic_arn: str | None = None

    @property
    def ses_name(self) -> str:
        """The SES export's wrapper key, e.g. `S3Action`."""
        return self.TYPE + "Action"

    def to_config(self) -> dict[str, Any]:
        body = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        return {self.KEY: body}


@dataclass(frozen=True)
class AddHeaderAction(Action):
    KEY: ClassVar[str] = "add_header"
    TYPE: ClassVar[str] = "AddHeader"
    header_name: str = ""
    header_value: str = ""


@dataclass(frozen=True)
class S3Action(Action):
    KEY: ClassVar[str] = "s3"
    TYPE: ClassVar[str] = "S3"
    EMAIL_LIMIT: ClassVar[int | None] = S3_EMAIL_LIMIT
    bucket_name: str = ""
    object_key_prefix: str | None = None
    kms_key_arn: str | None = None


@dataclass(frozen=True)
class SNSAction(Action):
    KEY: ClassVar[str] = "sns"
    TYPE: ClassVar[str] = "SNS"
    EMAIL_LIMIT: ClassVar[int | None] = SNS_EMAIL_LIMIT
    encoding: str = default("$defs.action.sns.encoding")


@dataclass(frozen=True)
class LambdaAction(Action):
    KEY: ClassVar[str] = "lambda"
    TYPE: ClassVar[str] = "Lambda"
    function_arn: str = ""
    invocation_type: str = default("$defs.action.lambda.invocation_type")


@dataclass(frozen=True)
class BounceAction(Action):
    KEY: ClassVar[str] = "bounce"
    TYPE: ClassVar[str] = "Bounce"
    smtp_reply_code: str = ""
    status_code: str | None = None
    message: str = ""
    sender: str = ""


@dataclass(frozen=True)
class StopAction(Action):
    KEY: ClassVar[str] = "stop"
    TYPE: ClassVar[str] = "Stop"
    scope: str = "RuleSet"


ACTION_TYPES: dict[str, type[Action]] = {
    cls.KEY: cls
    for cls in (AddHeaderAction, S3Action, SNSAction, LambdaAction, BounceAction, StopAction)
}


def action_from_config(item: dict[str, Any]) -> Action:
    """Build an action from its YAML form `{key: {field: value}}` (already validated)."""
    ((key, body),) = item.items()
    cls = ACTION_TYPES[key]
    return cls(**(body or {}))


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
