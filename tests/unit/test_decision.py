"""The pure decision core: connect, MAIL, RCPT verdicts and the action plan."""

from __future__ import annotations

import textwrap

import pytest

from mxrules.config import load
from mxrules.decision import (
    CONTINUE,
    TOO_BIG,
    TOO_BIG_FOR_ACTIONS,
    Engine,
    RcptDecision,
    Reply,
    RulePlan,
    bounce_reply,
    bounce_size,
    in_stream_headers,
    rcpt_bounce,
)
from mxrules.ipfilter import parse_ip
from mxrules.rules import (
    Action,
    AddHeaderAction,
    BounceAction,
    LambdaAction,
    Rule,
    S3Action,
    SNSAction,
    StopAction,
)


def _engine(tmp_path, body: str, name: str = "mxrules.yaml") -> Engine:
    path = tmp_path / name
    path.write_text("hostname: mx.example.com\n" + textwrap.dedent(body))
    return Engine(load(str(path)))


CONFIG = """\
domains: [example.com, secure.example.com]
max_message_size: 10240
ip_filters:
  - {name: office, policy: Allow, cidr: 192.0.2.0/24}
  - {name: bad-net, policy: Block, cidr: 198.51.100.0/24}
  - {name: bad-v6, policy: Block, cidr: "2001:db8:bad::/48"}
rule_sets:
  default:
    - name: info
      enabled: true
      recipients: [info@example.com, sales@example.com]
      actions:
        - add_header: {header_name: X-Info, header_value: "1"}
    - name: secure
      enabled: true
      tls_policy: Require
      recipients: [secure.example.com, vault@example.com]
    - name: sales
      enabled: true
      recipients: [sales@example.com]
      scan_enabled: true
"""


@pytest.mark.parametrize(
    ("recipient", "tls", "outcome", "rules", "reply"),
    [
        pytest.param("info@example.com", False, "accepted", ("info",), "250 2.0.0",
                     id="matched"),
        pytest.param("sales@example.com", False, "accepted", ("info", "sales"), "250 2.0.0",
                     id="two-rules"),
        pytest.param("nobody@example.com", False, "no-rule", (),
                     "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown",
                     id="managed-without-rule-550"),
        pytest.param("<nobody@example.com>", True, "no-rule", (),
                     "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown",
                     id="brackets-not-doubled"),
        pytest.param("x@unmanaged.test", False, "unmanaged", (), "250 2.0.0",
                     id="unmanaged-continues"),
        pytest.param("postmaster", False, "unmanaged", (), "250 2.0.0",
                     id="no-domain-unmanaged"),
        pytest.param("a@secure.example.com", False, "tls-required", ("secure",),
                     "530 5.7.0 Must issue a STARTTLS command first", id="tls-require-no-tls"),
        pytest.param("a@secure.example.com", True, "accepted", ("secure",), "250 2.0.0",
                     id="tls-require-with-tls"),
        pytest.param("vault@example.com", False, "tls-required", ("secure",),
                     "530 5.7.0 Must issue a STARTTLS command first", id="tls-require-address"),
        pytest.param("info@example.com", True, "accepted", ("info",), "250 2.0.0",
                     id="optional-tls-with-tls"),
    ],
)
def test_rcpt(tmp_path, recipient: str, tls: bool, outcome: str, rules: tuple[str, ...],
              reply: str) -> None:
    decision = _engine(tmp_path, CONFIG).rcpt(recipient, tls=tls)
    assert decision.outcome == outcome
    assert decision.rules == rules
    assert str(decision.reply) == reply
    assert decision.reply.verb == ("continue" if outcome in ("accepted", "unmanaged")
                                   else "reject")
    assert decision.handled is (outcome == "accepted")


def test_tls_require_applies_when_any_matching_rule_requires_it(tmp_path) -> None:
    engine = _engine(tmp_path, """\
        rule_sets:
          default:
            - name: open
              enabled: true
              recipients: [example.com]
            - name: strict
              enabled: true
              tls_policy: Require
              recipients: [boss@example.com]
        """)
    assert engine.rcpt("staff@example.com", tls=False).outcome == "accepted"
    refused = engine.rcpt("boss@example.com", tls=False)
    assert (refused.outcome, refused.rules) == ("tls-required", ("open", "strict"))
    assert engine.rcpt("boss@example.com", tls=True).outcome == "accepted"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("""\
            domains: [example.com]
            active_rule_set: null
            rule_sets:
              default:
                - name: info
                  enabled: true
                  recipients: [info@example.com]
            """, id="active-rule-set-null"),
        pytest.param("domains: [example.com]\n", id="no-rule-sets-at-all"),
        pytest.param("""\
            domains: [example.com]
            active_rule_set: null
            rule_sets:
              one: [{name: a, enabled: true}]
              two: [{name: b, enabled: true}]
            """, id="two-sets-none-active"),
    ],
)
def test_no_active_rule_set_rejects_managed_recipients(tmp_path, body: str) -> None:
    engine = _engine(tmp_path, body)
    assert engine.rule_set is None
    decision = engine.rcpt("info@example.com", tls=True)
    assert decision.outcome == "no-rule-set"
    assert str(decision.reply) == ("550 5.1.1 <info@example.com>: Recipient address rejected: "
                                   "no active rule set")
    assert engine.rcpt("x@other.test", tls=False).outcome == "unmanaged"
    assert engine.plan([decision]) == []


def test_active_rule_set_chooses_among_several(tmp_path) -> None:
    engine = _engine(tmp_path, """\
        active_rule_set: two
        rule_sets:
          one: [{name: a, enabled: true, recipients: [a@example.com]}]
          two: [{name: b, enabled: true, recipients: [b@example.com]}]
        """)
    assert engine.rule_set is not None and engine.rule_set.name == "two"
    assert engine.rcpt("b@example.com", tls=False).rules == ("b",)
    # a@example.com is in a managed domain (named by rule set one) but set one is not in force.
    assert engine.rcpt("a@example.com", tls=False).outcome == "no-rule"


# -- connect -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("client", "reply", "reason", "name"),
    [
        pytest.param("192.0.2.10", "250 2.0.0", "allow-filter", "office", id="allowed"),
        pytest.param("203.0.113.1", "250 2.0.0", "no-match", None, id="no-match"),
        pytest.param("198.51.100.7", "554 5.7.1 Client host [198.51.100.7] blocked by IP "
                     "address filter", "block-filter", "bad-net", id="block-filter"),
        pytest.param("::ffff:198.51.100.7", "554 5.7.1 Client host [198.51.100.7] blocked by IP "
                     "address filter", "block-filter", "bad-net", id="mapped-ipv6-client"),
        pytest.param("2001:db8:bad::1", "554 5.7.1 Client host [2001:db8:bad::1] blocked by IP "
                     "address filter", "block-filter", "bad-v6", id="ipv6-block"),
        pytest.param("10.9.9.9", "554 5.7.1 Client host [10.9.9.9] blocked using local "
                     "blocklist", "blocklist", "BL:2", id="blocklist"),
        pytest.param("192.0.2.66", "250 2.0.0", "allow-filter", "office",
                     id="allow-beats-blocklist"),
    ],
)
def test_connect(tmp_path, client: str, reply: str, reason: str, name: str | None) -> None:
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# local list\n10.0.0.0/8\n192.0.2.66\n")
    engine = _engine(tmp_path, CONFIG + "blocklists: [blocklist.txt]\n")
    decision = engine.connect(parse_ip(client))
    assert str(decision.reply) == reply
    assert decision.filters.reason == reason
    assert decision.filters.name == (name.replace("BL", str(blocklist)) if name else None)
    assert decision.client == str(parse_ip(client))


@pytest.mark.parametrize(
    ("forwarders", "client", "trusted"),
    [
        pytest.param(["192.0.2.0/28"], "192.0.2.5", True, id="ipv4"),
        pytest.param(["192.0.2.0/28"], "192.0.2.16", False, id="ipv4-outside"),
        pytest.param(["192.0.2.1/28"], "192.0.2.5", True, id="host-bits"),
        pytest.param(["2001:db8::/64"], "2001:db8::25", True, id="ipv6"),
        pytest.param(["192.0.2.0/28"], "::ffff:192.0.2.5", True, id="mapped-client"),
        pytest.param(["::ffff:192.0.2.0/124"], "192.0.2.5", True, id="mapped-forwarder-cidr"),
        pytest.param(["192.0.2.0/28"], "2001:db8::25", False, id="other-family"),
        pytest.param([], "192.0.2.5", False, id="none"),
    ],
)
def test_trusted_forwarders(tmp_path, forwarders: list[str], client: str, trusted: bool) -> None:
    engine = _engine(tmp_path, f"trusted_forwarders: {forwarders}\n")
    assert engine.is_trusted_forwarder(parse_ip(client)) is trusted


# -- MAIL FROM SIZE ------------------------------------------------------------

@pytest.mark.parametrize(
    ("size", "reply"),
    [
        pytest.param(None, CONTINUE, id="no-size"),
        pytest.param(0, CONTINUE, id="zero"),
        pytest.param(10240, CONTINUE, id="exactly-the-maximum"),
        pytest.param(10241, TOO_BIG, id="one-byte-over"),
    ],
)
def test_mail_size(tmp_path, size: int | None, reply: Reply) -> None:
    assert _engine(tmp_path, CONFIG).mail(size) == reply


def test_too_big_reply_text() -> None:
    assert str(TOO_BIG) == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert TOO_BIG.verb == "reject"


def test_default_max_message_size_is_40_mib(tmp_path) -> None:
    engine = _engine(tmp_path, "domains: [example.com]\n")
    assert engine.mail(40 * 1024 * 1024) == CONTINUE
    assert engine.mail(40 * 1024 * 1024 + 1) == TOO_BIG


# -- the plan -------------------------------------------------------------------

PLAN_CONFIG = """\
domains: [example.com, example.net]
rule_sets:
  default:
    - name: catch-all
      enabled: true
      scan_enabled: false
    - name: sales
      enabled: true
      recipients: [sales@example.com]
      scan_enabled: true
    - name: net
      enabled: true
      recipients: [example.net]
    - name: unused
      enabled: true
      recipients: [unused@example.com]
"""


def test_plan_lists_per_rule_only_the_recipients_it_matched(tmp_path) -> None:
    engine = _engine(tmp_path, PLAN_CONFIG)
    decisions = [engine.rcpt(r, tls=False) for r in (
        "<a@example.net>", "sales+x@example.com", "x@unmanaged.test", "b@example.net")]
    plan = engine.plan(decisions)
    assert [(p.rule.name, p.recipients) for p in plan] == [
        ("catch-all", ("<a@example.net>", "sales+x@example.com", "b@example.net")),
        ("sales", ("sales+x@example.com",)),
        ("net", ("<a@example.net>", "b@example.net")),
    ]
    assert engine.scan_wanted(plan) is True
    assert engine.scan_wanted([p for p in plan if p.rule.name != "sales"]) is False


def test_plan_ignores_rejected_recipients(tmp_path) -> None:
    engine = _engine(tmp_path, CONFIG)
    decisions = [engine.rcpt("a@secure.example.com", tls=False),
                 engine.rcpt("nobody@example.com", tls=False),
                 engine.rcpt("info@example.com", tls=False)]
    plan = engine.plan(decisions)
    assert [(p.rule.name, p.recipients) for p in plan] == [("info", ("info@example.com",))]
    assert engine.plan([engine.rcpt("x@unmanaged.test", tls=False)]) == []


def test_plan_follows_rule_set_order_not_recipient_order(tmp_path) -> None:
    engine = _engine(tmp_path, CONFIG)
    decisions = [engine.rcpt("a@secure.example.com", tls=True),
                 engine.rcpt("sales@example.com", tls=False)]
    assert [p.rule.name for p in engine.plan(decisions)] == ["info", "secure", "sales"]


def test_plan_carries_the_rule_objects(tmp_path) -> None:
    engine = _engine(tmp_path, CONFIG)
    (item,) = engine.plan([engine.rcpt("info@example.com", tls=False)])
    assert item.rule.actions == (AddHeaderAction(header_name="X-Info", header_value="1"),)


# -- in-stream headers -----------------------------------------------------------

H1 = AddHeaderAction(header_name="X-One", header_value="1")
H2 = AddHeaderAction(header_name="X-Two", header_value="2")
H3 = AddHeaderAction(header_name="X-Three", header_value="3")
STOP = StopAction()
EVENT = LambdaAction(function_arn="arn:aws:lambda:us-east-1:1:function:f")
REQUEST = LambdaAction(function_arn="arn:aws:lambda:us-east-1:1:function:f",
                       invocation_type="RequestResponse")
S3 = S3Action(bucket_name="bucket")
SNS = SNSAction(topic_arn="arn:aws:sns:us-east-1:1:t")
BOUNCE = BounceAction(smtp_reply_code="550", message="no", sender="a@example.com")


def _plan(*rules: tuple) -> list[RulePlan]:
    return [RulePlan(Rule(name=f"r{i}", enabled=True, actions=tuple(actions)), ("a@b.c",))
            for i, actions in enumerate(rules)]


@pytest.mark.parametrize(
    ("plan", "headers"),
    [
        pytest.param(_plan(), [], id="empty-plan"),
        pytest.param(_plan((H1, S3, H2)), [("X-One", "1"), ("X-Two", "2")], id="one-rule"),
        pytest.param(_plan((H1,), (SNS, H2), (BOUNCE, H3)),
                     [("X-One", "1"), ("X-Two", "2"), ("X-Three", "3")],
                     id="across-rules-in-order"),
        pytest.param(_plan((H1, STOP, H2), (H3,)), [("X-One", "1")], id="stop-ends-everything"),
        pytest.param(_plan((H1,), (STOP,), (H2,)), [("X-One", "1")],
                     id="stop-in-earlier-rule"),
        pytest.param(_plan((H1, REQUEST, H2), (H3,)), [("X-One", "1")],
                     id="request-response-lambda-stops"),
        pytest.param(_plan((REQUEST,), (H1,)), [], id="request-response-first"),
        pytest.param(_plan((H1, EVENT, H2), (H3,)),
                     [("X-One", "1"), ("X-Two", "2"), ("X-Three", "3")],
                     id="event-lambda-does-not-stop"),
        pytest.param(_plan((H1, H1)), [("X-One", "1"), ("X-One", "1")], id="repeats-kept"),
    ],
)
def test_in_stream_headers(plan: list[RulePlan], headers: list[tuple[str, str]]) -> None:
    assert in_stream_headers(plan) == headers


def test_in_stream_headers_from_a_config(tmp_path) -> None:
    engine = _engine(tmp_path, """\
        rule_sets:
          default:
            - name: first
              enabled: true
              recipients: [a@example.com]
              actions:
                - add_header: {header_name: X-First, header_value: "yes"}
                - lambda: {function_arn: "arn:aws:lambda:us-east-1:1:function:f"}
                - add_header: {header_name: X-After-Event, header_value: "ok"}
            - name: second
              enabled: true
              actions:
                - lambda:
                    function_arn: "arn:aws:lambda:us-east-1:1:function:g"
                    invocation_type: RequestResponse
                - add_header: {header_name: X-Too-Late, header_value: "no"}
        """)
    plan = engine.plan([engine.rcpt("a@example.com", tls=False)])
    assert [p.rule.name for p in plan] == ["first", "second"]
    assert in_stream_headers(plan) == [("X-First", "yes"), ("X-After-Event", "ok")]




def test_rcpt_decision_handled_only_when_accepted() -> None:
    assert RcptDecision("a@b.c", "accepted", ("r",), CONTINUE).handled
    assert not RcptDecision("a@b.c", "unmanaged", (), CONTINUE).handled


# -- a Bounce answered at RCPT --------------------------------------------------------

B552 = BounceAction(smtp_reply_code="552", status_code="5.2.2", message="Mailbox full",
                    sender="a@example.com")
B450 = BounceAction(smtp_reply_code="450", status_code="4.0.0", message="later",
                    sender="a@example.com")
NOTIFYING = BounceAction(smtp_reply_code="550", message="no", sender="a@example.com",
                         topic_arn="arn:aws:sns:us-east-1:1:t")


def _rules(*actions: tuple) -> list[Rule]:
    return [Rule(name=f"r{i}", enabled=True, actions=tuple(a)) for i, a in enumerate(actions)]


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param(_rules((BOUNCE,)), BOUNCE, id="bounce-only"),
        pytest.param(_rules((BOUNCE, STOP), (S3,)), BOUNCE, id="bounce-then-stop"),
        pytest.param(_rules((BOUNCE,), (STOP,), (S3,)), BOUNCE, id="stop-in-a-later-rule"),
        pytest.param(_rules((), (BOUNCE,)), BOUNCE, id="earlier-rule-without-actions"),
        pytest.param(_rules((BOUNCE, B552)), BOUNCE, id="two-bounces-first-answers"),
        pytest.param(_rules((H1, BOUNCE)), None, id="add-header-first"),
        pytest.param(_rules((S3,), (BOUNCE,)), None, id="earlier-rule-stores"),
        pytest.param(_rules((BOUNCE, S3)), None, id="later-action-needs-the-message"),
        pytest.param(_rules((BOUNCE,), (S3,)), None, id="later-rule-needs-the-message"),
        pytest.param(_rules((REQUEST, BOUNCE)), None, id="lambda-first"),
        pytest.param(_rules((NOTIFYING,)), None, id="bounce-with-topic"),
        pytest.param(_rules((BOUNCE, StopAction(topic_arn="arn:aws:sns:us-east-1:1:t"))), None,
                     id="stop-with-topic"),
        pytest.param(_rules((B450,)), None, id="4xx-left-to-the-worker"),
        pytest.param(_rules((STOP, BOUNCE)), None, id="stop-first-nothing-to-bounce"),
        pytest.param(_rules(()), None, id="no-actions"),
    ],
)
def test_rcpt_bounce(rules: list[Rule], expected: BounceAction | None) -> None:
    assert rcpt_bounce(rules) == expected


@pytest.mark.parametrize(
    ("action", "reply"),
    [
        pytest.param(B552, "552 5.2.2 Mailbox full", id="as-configured"),
        pytest.param(BounceAction(smtp_reply_code="550", message="gone"), "550 5.0.0 gone",
                     id="no-status"),
        pytest.param(BounceAction(smtp_reply_code="550", status_code="4.2.2", message="x"),
                     "550 5.0.0 x", id="status-of-another-class"),
        pytest.param(BounceAction(smtp_reply_code="554", status_code="5.7.1",
                                  message="Bo\u00eete  pleine\t100%\x00"),
                     "554 5.7.1 Bo?te pleine 100%?", id="printable-ascii-one-line"),
        pytest.param(BounceAction(smtp_reply_code="550", message="m" * 2048),
                     "550 5.0.0 " + "m" * 400, id="long-cut"),
    ],
)
def test_bounce_reply(action: BounceAction, reply: str) -> None:
    assert str(bounce_reply(action)) == reply
    assert bounce_reply(action).verb == "reject"


BOUNCE_CONFIG = """\
domains: [example.com]
{extra}
rule_sets:
  default:
    - name: departed
      enabled: true
      recipients: [bob@example.com]
      actions:
        - bounce: {{smtp_reply_code: "550", status_code: 5.1.1, message: No such user,
                    sender: postmaster@example.com}}
    - name: store
      enabled: true
      recipients: [alice@example.com]
      actions:
        - s3: {{bucket_name: mail-bucket}}
"""


@pytest.mark.parametrize(
    ("extra", "forwarded", "outcome", "reply"),
    [
        pytest.param("", False, "bounced", "550 5.1.1 No such user", id="default-refused"),
        pytest.param("", True, "accepted", "250 2.0.0", id="trusted-forwarder-accepted"),
        pytest.param("delivery: deliver", False, "accepted", "250 2.0.0",
                     id="deliver-mode-accepted"),
        pytest.param("bounce: {reject_at_rcpt: false}", False, "accepted", "250 2.0.0",
                     id="switched-off"),
    ],
)
def test_rcpt_refuses_a_recipient_that_would_only_be_bounced(
        tmp_path, extra: str, forwarded: bool, outcome: str, reply: str) -> None:
    engine = _engine(tmp_path, BOUNCE_CONFIG.format(extra=extra))
    decision = engine.rcpt("bob@example.com", tls=False, forwarded=forwarded)
    assert (decision.outcome, decision.rules, str(decision.reply)) == (
        outcome, ("departed",), reply)
    assert decision.handled is (outcome == "accepted")
    other = engine.rcpt("alice@example.com", tls=False, forwarded=forwarded)
    assert other.outcome == "accepted"

# -- SES's size limits on S3 and SNS actions --------------------------------------

S3_LIMIT, SNS_LIMIT = 40 * 1024 * 1024, 150 * 1024
HEADER = AddHeaderAction(header_name="X-A", header_value="12345")  # "X-A: 12345\r\n": 12 bytes
RR = LambdaAction(function_arn="arn:aws:lambda:us-east-1:1:function:f",
                  invocation_type="RequestResponse")


@pytest.mark.parametrize(
    ("actions", "size"),
    [
        pytest.param((S3Action(bucket_name="b"),), S3_LIMIT, id="s3"),
        pytest.param((SNSAction(topic_arn="t"),), SNS_LIMIT, id="sns"),
        pytest.param((S3Action(bucket_name="b"), SNSAction(topic_arn="t")), SNS_LIMIT,
                     id="the-smaller-limit"),
        pytest.param((HEADER, SNSAction(topic_arn="t")), SNS_LIMIT - 12,
                     id="addheader-before-counts"),
        pytest.param((SNSAction(topic_arn="t"), HEADER), SNS_LIMIT, id="addheader-after-not"),
        pytest.param((RR, SNSAction(topic_arn="t")), None, id="after-request-response"),
        pytest.param((LambdaAction(function_arn="f"), SNSAction(topic_arn="t")), SNS_LIMIT,
                     id="after-event-lambda"),
        pytest.param((StopAction(), SNSAction(topic_arn="t")), None, id="after-stop"),
        pytest.param((S3Action(bucket_name="b"), StopAction(), SNSAction(topic_arn="t")),
                     S3_LIMIT, id="before-stop"),
        pytest.param((BounceAction(smtp_reply_code="550", message="m", sender="s"),), None,
                     id="no-limited-action"),
        pytest.param((), None, id="no-action"),
    ],
)
def test_bounce_size(actions: tuple[Action, ...], size: int | None) -> None:
    assert bounce_size(Rule(name="r", enabled=True, actions=actions)) == size


SIZED = """\
domains: [example.com]
delivery: {delivery}
rule_sets:
  default:
    - name: publish
      enabled: true
      recipients: [sns@example.com, both@example.com]
      actions: [{{sns: {{topic_arn: "arn:aws:sns:us-east-1:1:t"}}}}]
    - name: store
      enabled: true
      recipients: [s3@example.com, both@example.com]
      actions: [{{s3: {{bucket_name: mail-bucket}}}}]
    - name: call
      enabled: true
      recipients: [call@example.com]
      actions: [{{lambda: {{function_arn: "arn:aws:lambda:us-east-1:1:function:f"}}}}]
"""


@pytest.mark.parametrize(
    ("rcpt", "size", "outcome"),
    [
        pytest.param("sns@example.com", None, "accepted", id="no-size"),
        pytest.param("sns@example.com", SNS_LIMIT, "accepted", id="sns-at-the-limit"),
        pytest.param("sns@example.com", SNS_LIMIT + 1, "too-big", id="sns-over"),
        pytest.param("s3@example.com", SNS_LIMIT + 1, "accepted", id="s3-under"),
        pytest.param("s3@example.com", S3_LIMIT + 1, "too-big", id="s3-over"),
        pytest.param("both@example.com", SNS_LIMIT + 1, "accepted", id="one-rule-takes-it"),
        pytest.param("both@example.com", S3_LIMIT + 1, "too-big", id="every-rule-bounces"),
        pytest.param("call@example.com", S3_LIMIT + 1, "accepted", id="no-limit"),
    ],
)
def test_rcpt_refuses_a_recipient_every_rule_of_which_would_bounce(
        tmp_path, rcpt: str, size: int | None, outcome: str) -> None:
    decision = _engine(tmp_path, SIZED.format(delivery="consume")).rcpt(rcpt, tls=False,
                                                                        size=size)
    assert decision.outcome == outcome
    if outcome == "too-big":
        limit = SNS_LIMIT if rcpt == "sns@example.com" else S3_LIMIT
        assert str(decision.reply) == (f"550 5.3.4 <{rcpt}>: Recipient address rejected: "
                                       f"message size exceeds the limit of {limit} bytes")
    else:
        assert decision.reply == CONTINUE


def test_rcpt_never_refuses_for_size_when_postfix_delivers_too(tmp_path) -> None:
    engine = _engine(tmp_path, SIZED.format(delivery="deliver"))
    assert engine.rcpt("sns@example.com", tls=False, size=S3_LIMIT + 1).outcome == "accepted"


def test_rcpt_never_refuses_a_trusted_forwarders_recipient_for_size(tmp_path) -> None:
    """The forwarder would send the DSN to whatever sender the mail claims."""
    engine = _engine(tmp_path, SIZED.format(delivery="consume"))
    decision = engine.rcpt("sns@example.com", tls=False, forwarded=True, size=S3_LIMIT + 1)
    assert decision.outcome == "accepted"


@pytest.mark.parametrize(
    ("rcpts", "size", "too_big"),
    [
        pytest.param(["sns@example.com"], SNS_LIMIT + 1, True, id="one-over"),
        pytest.param(["sns@example.com"], SNS_LIMIT, False, id="at-the-limit"),
        pytest.param(["sns@example.com", "s3@example.com"], SNS_LIMIT + 1, False,
                     id="another-takes-it"),
        pytest.param(["sns@example.com", "s3@example.com"], S3_LIMIT + 1, True, id="all-over"),
        pytest.param(["sns@example.com", "friend@elsewhere.test"], S3_LIMIT + 1, False,
                     id="an-unmanaged-recipient"),
        pytest.param(["sns@example.com", "nobody@example.com"], SNS_LIMIT + 1, True,
                     id="a-refused-recipient-is-not-counted"),
        pytest.param(["call@example.com"], S3_LIMIT + 1, False, id="no-limit"),
        pytest.param(["friend@elsewhere.test"], S3_LIMIT + 1, False, id="nothing-handled"),
    ],
)
def test_too_big_at_end_of_data(tmp_path, rcpts: list[str], size: int, too_big: bool) -> None:
    engine = _engine(tmp_path, SIZED.format(delivery="consume"))
    decisions = [engine.rcpt(r, tls=False) for r in rcpts]
    assert engine.too_big(decisions, size) is too_big
    deliver = _engine(tmp_path, SIZED.format(delivery="deliver"), name="deliver.yaml")
    assert deliver.too_big([deliver.rcpt(r, tls=False) for r in rcpts], size) is False


def test_too_big_for_actions_reply_text() -> None:
    assert str(TOO_BIG_FOR_ACTIONS) == (
        "552 5.3.4 Message size exceeds the limit of the receipt rules' actions")
