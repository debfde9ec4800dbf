"""Every action type, defined once: its model and what each part of mxrules needs of it.

An action type is a frozen dataclass (its YAML key and SES type as class
variables) and one `ActionSpec` in `SPECS`: the runner module in actions/ that
does it, its fields in SES payloads, its line in `mxrules explain`, and how it
bears on what the milter can do before the 250 (in-stream AddHeaders, the
size bounce).  The schema's action keys and fields, the metrics' `type`
labels, `rules.ACTION_TYPES` and the runner's table are all checked against or
derived from `SPECS` (tests/unit/test_actionspec.py), so a new action touches
its module in actions/, its entry here, the schema and the docs (README,
"Adding an action").

The core never imports actions/: a spec names its runner module, which the
worker imports (actions.runner).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Generic, TypeVar

from .configschema import default
from .errors import MxrulesError

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


A = TypeVar("A", bound=Action)
Header = tuple[str, str]


def _never(action: Action) -> bool:
    return False


@dataclass(frozen=True)
class ActionSpec(Generic[A]):
    """What mxrules needs of one action type besides its dataclass."""

    cls: type[A]
    module: str  # the module in actions/ whose `run(ctx) -> Outcome` does it
    # SES's `receipt.action` fields after `type` and `topicArn`, in SES's order;
    # called with the action and the job's messageId.
    payload: Callable[[A, str], dict[str, Any]]
    describe: Callable[[A], str]  # its line in `mxrules explain`
    # The header it adds to Postfix's copy at end of data (AddHeader only).
    header: Callable[[A], Header] | None = None
    # Whether its run may end the rule or the rule set, which only the worker
    # learns: the milter adds no in-stream header, nor counts a size limit, past it.
    may_stop: Callable[[A], bool] = _never
    # Its topic_arn is where it publishes the email (SNS), not a notification after it.
    own_topic: bool = False
    # A requeue of a job whose later action failed runs it again: it only shapes
    # the stored copies made after it (AddHeader).
    rerun_on_requeue: bool = False

    @property
    def key(self) -> str:
        return self.cls.KEY

    @property
    def ses_type(self) -> str:
        return self.cls.TYPE


# -- each type's payload fields and explain text --------------------------------

_ENCODINGS = MappingProxyType({"UTF-8": "UTF8", "UTF8": "UTF8", "BASE64": "BASE64"})


def s3_key(prefix: str | None, message_id: str) -> str:
    """`prefix/messageId` (one `/`, added only when the prefix lacks it), or the id alone."""
    if not prefix:
        return message_id
    return prefix + message_id if prefix.endswith("/") else f"{prefix}/{message_id}"


def sns_encoding(encoding: str) -> str:
    """The rule's `UTF-8`/`Base64` as SES spells it in payloads: `UTF8`/`BASE64`."""
    try:
        return _ENCODINGS[encoding.upper()]
    except KeyError:
        raise ValueError(f"unknown SNS encoding {encoding!r}") from None


def _s3_fields(action: S3Action, message_id: str) -> dict[str, Any]:
    # objectKeyPrefix is always present, as configured ("" when none): SES's own output does so.
    return {"bucketName": action.bucket_name, "objectKeyPrefix": action.object_key_prefix or "",
            "objectKey": s3_key(action.object_key_prefix, message_id)}


def _s3_text(action: S3Action) -> str:
    text = f"S3 put s3://{action.bucket_name}/{s3_key(action.object_key_prefix, '<messageId>')}"
    return text + (f" (SSE-KMS {action.kms_key_arn})" if action.kms_key_arn else "")


def _bounce_fields(action: BounceAction, message_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {"smtpReplyCode": action.smtp_reply_code}
    if action.status_code:
        out["statusCode"] = action.status_code
    return out | {"message": action.message, "sender": action.sender}


def _bounce_text(action: BounceAction) -> str:
    status = f" {action.status_code}" if action.status_code else ""
    return (f"Bounce {action.smtp_reply_code}{status} \"{action.message}\" "
            f"from {action.sender} to the envelope sender")


_SPECS: tuple[ActionSpec[Any], ...] = (
    ActionSpec(
        AddHeaderAction, "add_header",
        payload=lambda a, _id: {"headerName": a.header_name, "headerValue": a.header_value},
        describe=lambda a: f"AddHeader {a.header_name}: {a.header_value}",
        header=lambda a: (a.header_name, a.header_value), rerun_on_requeue=True),
    ActionSpec(S3Action, "s3", payload=_s3_fields, describe=_s3_text),
    ActionSpec(
        SNSAction, "sns", payload=lambda a, _id: {"encoding": sns_encoding(a.encoding)},
        describe=lambda a: f"SNS publish to {a.topic_arn} (content {a.encoding})",
        own_topic=True),
    ActionSpec(
        LambdaAction, "lambda_invoke",
        payload=lambda a, _id: {"functionArn": a.function_arn,
                                "invocationType": a.invocation_type},
        describe=lambda a: f"Lambda {a.function_arn} ({a.invocation_type})",
        may_stop=lambda a: a.invocation_type == "RequestResponse"),
    ActionSpec(BounceAction, "bounce", payload=_bounce_fields, describe=_bounce_text),
    ActionSpec(StopAction, "stop", payload=lambda a, _id: {},
               describe=lambda a: "Stop (ends the rule set)", may_stop=lambda a: True),
)

# The registry, by YAML key, in the order the docs and metrics list them.
SPECS: MappingProxyType[str, ActionSpec[Any]] = MappingProxyType(
    {spec.key: spec for spec in _SPECS})
_BY_CLASS: MappingProxyType[type[Action], ActionSpec[Any]] = MappingProxyType(
    {spec.cls: spec for spec in _SPECS})
ACTION_TYPES: MappingProxyType[str, type[Action]] = MappingProxyType(
    {key: spec.cls for key, spec in SPECS.items()})
SES_TYPES = tuple(spec.ses_type for spec in _SPECS)  # metrics' `type` label values


class UnknownAction(MxrulesError):
    """An action object of a type with no spec: a programming error, never config."""


def spec_for(action: Action) -> ActionSpec[Any]:
    try:
        return _BY_CLASS[type(action)]
    except KeyError:
        raise UnknownAction(f"no spec for action {type(action).__name__}") from None


def narrow(action: Action, cls: type[A]) -> A:
    """`action` as a `cls`, or an error (unlike `assert isinstance`, which -O removes)."""
    if not isinstance(action, cls):
        raise UnknownAction(f"expected a {cls.__name__}, got {type(action).__name__}")
    return action


def action_from_config(item: dict[str, Any]) -> Action:
    """Build an action from its YAML form `{key: {field: value}}` (already validated)."""
    ((key, body),) = item.items()
    return ACTION_TYPES[key](**(body or {}))


def describe(action: Action) -> str:
    """The action's line in `mxrules explain`, with its notification if it has one."""
    spec = spec_for(action)
    text: str = spec.describe(action)
    if action.topic_arn and not spec.own_topic:
        text += f"; notify {action.topic_arn}"
    return text


def notifies(action: Action) -> bool:
    """Whether a notification to its topic_arn follows the action."""
    return bool(action.topic_arn) and not spec_for(action).own_topic


def in_stream_header(action: Action) -> Header | None:
    spec = spec_for(action)
    return spec.header(action) if spec.header else None


def may_stop(action: Action) -> bool:
    return bool(spec_for(action).may_stop(action))
