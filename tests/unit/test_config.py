"""Loading and checking mxrules.yaml: every problem named as file:line: path: what."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from mxrules import cli
from mxrules.actionspec import SPECS
from mxrules.config import default, load
from mxrules.errors import EX_CONFIG, ConfigError
from mxrules.rules import (
    AddHeaderAction,
    IpFilter,
    Limits,
    Rule,
    S3Action,
    StopAction,
)

MARK = "# <-"  # ends the line a problem must be reported on


def _write(tmp_path, text: str, name: str = "mxrules.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _marked_line(text: str) -> int:
    lines = textwrap.dedent(text).splitlines()
    (number,) = [n for n, line in enumerate(lines, 1) if line.rstrip().endswith(MARK)]
    return number


def _check(path: str, capsys) -> tuple[int, str, str]:
    code = cli.main(["check-config", "--config", path])
    out, err = capsys.readouterr()
    return code, out, err


def _stops(n: int) -> str:
    return ", ".join(["{stop: {scope: RuleSet}}"] * n)


LONG_NAME = "r" * 65

BAD = [
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              enabled: true
              actions:
                - add_header: {header_name: X-A, header_value: one}
                - forward: {to: a@example.org}  # <-
        """,
        "rule_sets.default[0].actions[1]",
        f"unknown action 'forward' (expected one of: {', '.join(sorted(SPECS))})",
        id="unknown-action"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - {}  # <-
        """,
        "rule_sets.default[0].actions[0]",
        "must be exactly one of add_header, s3, sns, lambda, bounce, stop",
        id="empty-action"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - stop: {scope: RuleSet}  # <-
                  s3: {bucket_name: bucket}
        """,
        "rule_sets.default[0].actions[0]",
        "must be exactly one of add_header, s3, sns, lambda, bounce, stop",
        id="two-actions-in-one-item"),
    pytest.param(
        """\
        ip_filters:
          - {name: ok, policy: Allow, cidr: 192.0.2.0/24}
          - name: bad
            policy: Block
            cidr: 10.0.0.300/8  # <-
        """,
        "ip_filters[1].cidr", "not an address or CIDR", id="bad-cidr"),
    pytest.param(
        """\
        ip_filters:
          - {name: v6, policy: Block, cidr: "2001:db8::/129"}  # <-
        """,
        "ip_filters[0].cidr", "not an address or CIDR", id="bad-ipv6-prefix"),
    pytest.param(
        """\
        ip_filters:
          - {name: v6, policy: Deny, cidr: 192.0.2.1}  # <-
        """,
        "ip_filters[0].policy", "'Deny' is not one of: Allow, Block", id="bad-policy"),
    pytest.param(
        """\
        ip_filters:
          - {name: one, policy: Block, cidr: 192.0.2.1}  # <-
          - {name: one, policy: Allow, cidr: 192.0.2.2}
        """,
        "ip_filters", "duplicate IP filter name 'one'", id="duplicate-filter-names"),
    pytest.param(
        f"""\
        rule_sets:
          default:
            - name: {LONG_NAME}  # <-
        """,
        "rule_sets.default[0].name", "too long (65 characters, at most 64)",
        id="rule-name-65-chars"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: -starts-with-dash  # <-
        """,
        "rule_sets.default[0].name", "'-starts-with-dash' is not valid: expected ASCII",
        id="rule-name-bad-start"),
    pytest.param(
        """\
        rule_sets:
          "bad name":  # <-
            - name: r1
        """,
        "rule_sets", "'bad name' is not valid: expected ASCII letters", id="rule-set-name-bad"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - add_header:
                    header_name: X-Injected
                    header_value: "a\\r\\nBcc: victim@example.org"  # <-
        """,
        "rule_sets.default[0].actions[0].add_header.header_value",
        "is not valid: expected at most 2048 characters, no CR or LF",
        id="add-header-value-crlf"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - add_header: {header_name: X-A, header_value: "a\\nb"}  # <-
        """,
        "rule_sets.default[0].actions[0].add_header.header_value",
        "no CR or LF", id="add-header-value-lf"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - add_header: {header_name: X-A, header_value: "a\\rb"}  # <-
        """,
        "rule_sets.default[0].actions[0].add_header.header_value",
        "no CR or LF", id="add-header-value-cr"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - add_header: {header_name: X-A, header_value: "trailing\\n"}  # <-
        """,
        "rule_sets.default[0].actions[0].add_header.header_value",
        "no CR or LF", id="add-header-value-trailing-lf"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - add_header:
                    header_name: X-A
                    header_value: |  # <-
                      block scalars end with a newline
        """,
        "rule_sets.default[0].actions[0].add_header.header_value",
        "no CR or LF", id="add-header-value-block-scalar"),
    # Control characters in anything that ends up in a header, the DSN or SMTP:
    # NUL made every message of the rule fail after it was stored.
    *[pytest.param(
        f"""\
        rule_sets:
          default:
            - name: r1
              actions:
                - {action}: {{{fields}"{text.format(value)}"}}  # <-
        """,
        f"rule_sets.default[0].actions[0].{action}.{field}",
        "control character", id=f"{action}-{field}-{name}")
      for name, value in [("nul", "\\0"), ("escape", "\\x1b[31m"), ("del", "\\x7f"),
                          ("vertical-tab", "\\v"), ("lone-surrogate", "\\udc80")]
      for action, field, fields, text in [
          ("add_header", "header_value", "header_name: X-A, header_value: ", "a{}b"),
          ("bounce", "message", "smtp_reply_code: '550', sender: b@example.com, message: ",
           "a{}b"),
          ("bounce", "sender", "smtp_reply_code: '550', message: m, sender: ",
           "b{}@example.com")]],
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - add_header: {header_name: "X-A\\n", header_value: x}  # <-
        """,
        "rule_sets.default[0].actions[0].add_header.header_name",
        "is not valid: expected 1 to 50 of A-Z a-z 0-9 -", id="add-header-name-trailing-lf"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - add_header: {header_name: "X A", header_value: x}  # <-
        """,
        "rule_sets.default[0].actions[0].add_header.header_name",
        "'X A' is not valid: expected 1 to 50 of A-Z a-z 0-9 -", id="add-header-name-space"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: same
            - name: other
            - name: same  # <-
        """,
        "rule_sets.default[2].name", "duplicate rule name 'same' (also rule 0)",
        id="duplicate-rule-names"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              enabled: true
              enabled: false  # <-
        """,
        "", "not valid YAML: duplicate key 'enabled' (first at line 4)",
        id="duplicate-yaml-keys"),
    pytest.param(
        """\
        domains: [example.com]
        domains: [example.org]  # <-
        """,
        "", "not valid YAML: duplicate key 'domains' (first at line 1)",
        id="duplicate-top-level-keys"),
    pytest.param(
        """\
        active_rule_set: prod  # <-
        rule_sets:
          default:
            - name: r1
        """,
        "active_rule_set", "no rule set named 'prod' (known: default)",
        id="unknown-active-rule-set"),
    pytest.param(
        """\
        rule_sets:  # <-
          one: [{name: a}]
          two: [{name: b}]
        """,
        "", "active_rule_set is required when there is more than one rule set (one, two)",
        id="two-sets-no-active"),
    pytest.param(
        """\
        domains: [example.com]  # <-
        rule_sets:
          default:
            - name: r1
              recipients: [info@example.com, info@other.test]
        """,
        "domains",
        "rule 'r1' of rule set 'default' names 'other.test', which is not a managed domain",
        id="recipient-outside-domains"),
    pytest.param(
        """\
        domains: [example.com]  # <-
        rule_sets:
          default:
            - name: r1
              recipients: [.example.com]
        """,
        "domains", "names '.example.com', which is not a managed domain",
        id="subdomains-not-managed"),
    pytest.param(
        f"""\
        rule_sets:
          default:
            - name: busy
              actions: [{_stops(11)}]  # <-
        """,
        "rule_sets.default[0].actions", "11 actions, more than the limit of 10",
        id="eleven-actions"),
    pytest.param(
        f"""\
        limits: {{actions_per_rule: 12}}
        rule_sets:
          default:
            - name: busy
              actions: [{_stops(13)}]  # <-
        """,
        "rule_sets.default[0].actions", "13 actions, more than the limit of 12",
        id="over-raised-action-limit"),
    pytest.param(
        "rule_sets:\n  default:\n    - name: many\n"
        f"      recipients: [{', '.join(f'u{i}@example.com' for i in range(101))}]  {MARK}\n",
        "rule_sets.default[0].recipients", "101 recipients, more than the limit of 100",
        id="over-100-recipients"),
    pytest.param(
        "ip_filters:\n" + "".join(f"  - {{name: f{i}, policy: Block, cidr: 10.0.{i}.0/24}}"
                                  + (f"  {MARK}\n" if i == 0 else "\n") for i in range(101)),
        "ip_filters", "101 IP filters, more than the limit of 100 (limits.ip_filters)",
        id="over-100-ip-filters"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              tls_policy: Required  # <-
        """,
        "rule_sets.default[0].tls_policy", "'Required' is not one of: Require, Optional",
        id="bad-tls-policy"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              enabled: "yes"  # <-
        """,
        "rule_sets.default[0].enabled", "must be of type boolean (got str)",
        id="enabled-not-boolean"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - lambda: {function_arn: "arn:aws:lambda:us-east-1:1:function:f",
                           invocation_type: Sync}  # <-
        """,
        "rule_sets.default[0].actions[0].lambda.invocation_type",
        "'Sync' is not one of: Event, RequestResponse", id="bad-invocation-type"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - s3: {bucket_name: my-bucket, kms_key_arn: "alias/mine"}  # <-
        """,
        "rule_sets.default[0].actions[0].s3.kms_key_arn",
        "'alias/mine' is not valid: expected an ARN", id="kms-key-not-an-arn"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - bounce: {smtp_reply_code: "250", message: x, sender: a@example.com}  # <-
        """,
        "rule_sets.default[0].actions[0].bounce.smtp_reply_code",
        "'250' is not valid: expected a 4xx or 5xx SMTP reply code", id="bounce-250"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              actions:
                - sns: {encoding: Base64}  # <-
        """,
        "rule_sets.default[0].actions[0].sns", "'topic_arn' is required",
        id="sns-without-topic"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
              recipients: ["info@example.com\\n"]  # <-
        """,
        "rule_sets.default[0].recipients[0]", "is not valid: expected an address",
        id="recipient-trailing-newline"),
    pytest.param(
        """\
        trusted_forwarders:
          - 192.0.2.0/24
          - 192.0.2.0/33  # <-
        """,
        "trusted_forwarders[1]", "not an address or CIDR", id="bad-trusted-forwarder"),
    pytest.param(
        """\
        forwarder_unresolved: accept  # <-
        """,
        "forwarder_unresolved", "'accept' is not one of: tempfail, reject",
        id="forwarder-unresolved-accept"),
    pytest.param(
        """\
        domains: [example.com]
        rule_set: default  # <-
        """,
        "", "unknown key 'rule_set' (expected one of: active_rule_set, aws, blocklists",
        id="unknown-top-level-key"),
    pytest.param(
        """\
        spool:
          directory: /var/spool/mxrules
          dir: /tmp  # <-
        """,
        "spool", "unknown key 'dir' (expected one of: directory, failed_max_age,"
        " failed_max_size)", id="unknown-nested-key"),
    pytest.param(
        """\
        hostname: mx.example.com
        domains: example.com: x  # <-
        rule_sets: {}
        """,
        "", "not valid YAML: mapping values are not allowed here", id="invalid-yaml"),
    pytest.param(
        """\
        rule_sets:
          default:
            - name: r1
           bad-indent: true  # <-
        """,
        "", "not valid YAML", id="invalid-yaml-indent"),
]


@pytest.mark.parametrize(("text", "path", "message"), BAD)
def test_bad_config_exits_78_naming_the_place(tmp_path, capsys, text: str, path: str,
                                              message: str) -> None:
    config = _write(tmp_path, text)
    code, out, err = _check(config, capsys)
    assert code == EX_CONFIG == 78
    assert out == ""
    where = f"{config}:{_marked_line(text)}" if MARK in text else config
    expected = f"{where}: {path}: " if path else f"{where}: "
    matching = [line for line in err.splitlines() if line.startswith(expected)]
    assert matching, f"no line starting {expected!r} in:\n{err}"
    assert any(message in line for line in matching), err


@pytest.mark.parametrize(("text", "path", "message"), BAD)
def test_bad_config_raises_config_error(tmp_path, text: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, text))
    assert any(p.path == path and message in p.message for p in info.value.problems), \
        info.value.problems


def test_missing_file(tmp_path, capsys) -> None:
    path = str(tmp_path / "absent.yaml")
    code, out, err = _check(path, capsys)
    assert (code, out) == (78, "")
    assert err == f"{path}: cannot read: No such file or directory\n"


def test_not_a_mapping(tmp_path, capsys) -> None:
    path = _write(tmp_path, "- just\n- a list\n")
    code, _, err = _check(path, capsys)
    assert code == 78
    assert err == f"{path}: must be a mapping of keys to values\n"


def test_bad_blocklist_line_reported_as_file_line(tmp_path, capsys) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "bad.txt").write_text("# header\n192.0.2.1\n192.0.2.999\n")
    path = _write(tmp_path, "blocklists: [lists/bad.txt]\n")
    code, _, err = _check(path, capsys)
    assert code == 78
    assert err.startswith(f"{tmp_path}/lists/bad.txt:3: not an address or CIDR")


def test_missing_blocklist_file(tmp_path, capsys) -> None:
    path = _write(tmp_path, "blocklists: [nowhere.txt]\n")
    code, _, err = _check(path, capsys)
    assert code == 78
    assert f"{tmp_path}/nowhere.txt: cannot read blocklist" in err


def test_every_problem_is_listed_at_once(tmp_path) -> None:
    text = """\
        active_rule_set: nope
        ip_filters:
          - {name: a, policy: Block, cidr: 300.0.0.0/8}
        rule_sets:
          default:
            - name: twice
            - name: twice
        """
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, text))
    assert sorted(p.path for p in info.value.problems) == [
        "active_rule_set", "ip_filters[0].cidr", "rule_sets.default[1].name"]


GOOD = f"""\
hostname: mx.example.com
domains: [example.com, .example.org]
local_part_case_sensitive: false
delivery: deliver
max_message_size: 1048576
spool: {{directory: spool}}
milter: {{listen: "inet:10025@127.0.0.1", timeout: 60, reload_interval: 0.5}}
ip_filters:
  - {{name: office, policy: Allow, cidr: 10.0.0.1/24}}
  - {{name: v6, policy: Block, cidr: "2001:db8::/32"}}
trusted_forwarders: ["192.0.2.0/28"]
forwarder_unresolved: reject
blocklists: [blocklist.txt]
active_rule_set: default
rule_sets:
  default:
    - name: {"r" * 64}
      enabled: true
      recipients: [info@example.com, .example.org]
      tls_policy: Require
      scan_enabled: true
      actions:
        - add_header: {{header_name: X-Mx, header_value: "{"v" * 2048}"}}
        - s3: {{bucket_name: my-bucket, object_key_prefix: "in/",
               kms_key_arn: "arn:aws:kms:us-east-1:123456789012:key/k"}}
        - stop: {{scope: RuleSet}}
    - name: off.by-default
  spare: []
"""


def test_good_config_exits_0(tmp_path, capsys) -> None:
    (tmp_path / "blocklist.txt").write_text("198.51.100.0/24\n")
    path = _write(tmp_path, GOOD)
    code, out, err = _check(path, capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{path}: ok",
        "  rule sets: default (2 rules), spare (0 rules); active: default",
        "  managed domains: example.com, .example.org",
        "  ip filters: 2; blocklist entries: 1",
        f"  delivery: deliver; spool: {tmp_path}/spool",
    ]


def test_good_config_builds_the_model(tmp_path) -> None:
    (tmp_path / "blocklist.txt").write_text("198.51.100.0/24\n")
    cfg = load(_write(tmp_path, GOOD))
    assert cfg.hostname == "mx.example.com"
    assert cfg.domains == ("example.com", ".example.org")
    assert cfg.delivery == "deliver"
    assert cfg.max_message_size == 1048576
    assert cfg.milter_listen == "inet:10025@127.0.0.1"
    assert (cfg.milter_timeout, cfg.reload_interval) == (60, 0.5)
    assert cfg.spool_directory == f"{tmp_path}/spool"
    assert cfg.trusted_forwarders == ("192.0.2.0/28",)
    assert cfg.forwarder_unresolved == "reject"
    assert cfg.ip_filters == (IpFilter("office", "Allow", "10.0.0.1/24"),
                              IpFilter("v6", "Block", "2001:db8::/32"))
    assert [label for _, label in cfg.blocklist] == [f"{tmp_path}/blocklist.txt:1"]
    assert cfg.files == (str(tmp_path / "mxrules.yaml"), str(tmp_path / "blocklist.txt"))
    assert cfg.active is cfg.rule_sets["default"]
    first, second = cfg.rule_sets["default"].rules
    assert first == Rule(
        name="r" * 64, enabled=True, recipients=("info@example.com", ".example.org"),
        tls_policy="Require", scan_enabled=True,
        actions=(AddHeaderAction(header_name="X-Mx", header_value="v" * 2048),
                 S3Action(bucket_name="my-bucket", object_key_prefix="in/",
                          kms_key_arn="arn:aws:kms:us-east-1:123456789012:key/k"),
                 StopAction(scope="RuleSet")))
    # SES's defaults: a rule is off until switched on; TLS optional; no scans.
    assert second == Rule(name="off.by-default")
    assert (second.enabled, second.tls_policy, second.scan_enabled) == (False, "Optional", False)
    assert cfg.rule_sets["spare"].rules == ()


def test_header_value_may_hold_tab_and_non_ascii_text(tmp_path) -> None:
    """Only controls that break a header are refused: TAB is folding white space."""
    cfg = load(_write(tmp_path, """\
        rule_sets:
          default:
            - name: r1
              actions:
                - add_header: {header_name: X-A, header_value: "tab\\there \u00e9t\u00e9"}
        """))
    [rule] = cfg.rule_sets["default"].rules
    assert rule.actions == (
        AddHeaderAction(header_name="X-A", header_value="tab\there \u00e9t\u00e9"),)


def test_defaults_of_an_empty_config(tmp_path) -> None:
    cfg = load(_write(tmp_path, "hostname: mx.example.com\n"))
    assert cfg.rule_sets == {}
    assert cfg.active_rule_set is None and cfg.active is None
    assert cfg.domains == ()
    assert cfg.delivery == "consume"
    assert cfg.forwarder_unresolved == "tempfail"
    assert cfg.max_message_size == default("max_message_size") == 40 * 1024 * 1024
    assert cfg.limits == Limits(200, 100, 10, 100)
    assert cfg.spool_directory == "/var/spool/mxrules"
    assert cfg.local_part_case_sensitive is False


@pytest.mark.parametrize(
    ("spool", "age", "size"),
    [
        pytest.param("{}", 14 * 86400.0, 1024**3, id="defaults"),
        pytest.param("{failed_max_age: 3600, failed_max_size: 5000}", 3600.0, 5000, id="given"),
        pytest.param("{failed_max_age: 0, failed_max_size: 0}", 0.0, 0, id="no-limits"),
    ],
)
def test_dead_letters_retention_settings(tmp_path, spool: str, age: float, size: int) -> None:
    cfg = load(_write(tmp_path, f"hostname: mx.example.com\nspool: {spool}\n"))
    assert (cfg.worker.failed_max_age, cfg.worker.failed_max_size) == (age, size)


@pytest.mark.parametrize("spool", [
    pytest.param("{failed_max_age: -1}", id="negative-age"),
    pytest.param("{failed_max_size: 1.5}", id="fractional-size"),
])
def test_bad_dead_letters_retention_settings(tmp_path, spool: str) -> None:
    with pytest.raises(ConfigError, match=r"spool\.failed_max"):
        load(_write(tmp_path, f"hostname: mx.example.com\nspool: {spool}\n"))


def test_the_only_rule_set_is_active_by_default(tmp_path) -> None:
    cfg = load(_write(tmp_path, "hostname: mx.example.com\nrule_sets:\n  main: [{name: a}]\n"))
    assert cfg.active_rule_set == "main"


@pytest.mark.parametrize(
    ("limits", "actions", "ok"),
    [
        pytest.param("", 10, True, id="ten-is-the-ses-limit"),
        pytest.param("", 11, False, id="eleven-refused"),
        pytest.param("limits: {actions_per_rule: 11}\n", 11, True, id="raised-to-eleven"),
        pytest.param("limits: {actions_per_rule: 25}\n", 25, True, id="raised-to-25"),
        pytest.param("limits: {actions_per_rule: 5}\n", 6, False, id="lowered"),
    ],
)
def test_actions_per_rule_limit(tmp_path, capsys, limits: str, actions: int, ok: bool) -> None:
    path = _write(tmp_path, f"hostname: mx.example.com\n{limits}rule_sets:\n  default:\n"
                            f"    - name: busy\n      actions: [{_stops(actions)}]\n")
    code, _, err = _check(path, capsys)
    assert code == (0 if ok else 78), err
    if ok:
        assert len(load(path).rule_sets["default"].rules[0].actions) == actions


def test_other_limits_can_be_raised(tmp_path) -> None:
    recipients = ", ".join(f"u{i}@example.com" for i in range(150))
    filters = "\n".join(f"  - {{name: f{i}, policy: Block, cidr: 10.0.{i}.0/24}}"
                        for i in range(150))
    text = ("hostname: mx.example.com\nlimits: {recipients_per_rule: 150, ip_filters: 150}\n"
            f"ip_filters:\n{filters}\n"
            f"rule_sets:\n  default:\n    - name: many\n      recipients: [{recipients}]\n")
    cfg = load(_write(tmp_path, text))
    assert len(cfg.ip_filters) == 150
    assert len(cfg.rule_sets["default"].rules[0].recipients) == 150


def test_rules_per_rule_set_limit(tmp_path) -> None:
    rules = "\n".join(f"    - name: r{i}" for i in range(201))
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, f"rule_sets:\n  default:\n{rules}\n"))
    (problem,) = info.value.problems
    assert (problem.path, problem.message) == (
        "rule_sets.default",
        "201 rules, more than the limit of 200 (limits.rules_per_rule_set)")


def test_load_from_text_uses_the_given_path(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "virtual.yaml"), "active_rule_set: x\n")
    (problem,) = info.value.problems
    assert str(problem) == (f"{tmp_path}/virtual.yaml:1: active_rule_set: "
                            "no rule set named 'x' (known: none)")


def test_config_error_message_lists_every_problem(tmp_path) -> None:
    path = _write(tmp_path, "active_rule_set: x\ntrusted_forwarders: [nope]\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).splitlines() == [
        f"{path}:1: active_rule_set: no rule set named 'x' (known: none)",
        f"{path}:2: trusted_forwarders[0]: not an address or CIDR: "
        "'nope' does not appear to be an IPv4 or IPv6 network",
    ]


@pytest.mark.parametrize(("scan", "path", "words"), [
    ({"dns": {"nameservers": ["dns.example"]}}, "scan.dns.nameservers", "bad name server"),
    ({"dns": {"nameservers": ["192.0.2.53:53", "192.0.2.53:5353"]}}, "scan.dns.nameservers",
     "two ports"),
    ({"spam": {"engine": "spamd", "address": "127.0.0.1:0"}}, "scan.spam.address",
     "neither host:port"),
    ({"virus": {"engine": "clamd", "address": "127.0.0.1:99999"}}, "scan.virus.address",
     "neither host:port"),
    ({"wait_timeout": 220}, "scan.wait_timeout", "more than 270 s"),
    ({"wait_timeout": 100, "timeout": 200}, "scan.wait_timeout", "is 300 s"),
    ({"concurrency": 0}, "scan.concurrency", "less than the minimum of 1"),
])
def test_unusable_scanner_settings_are_config_errors(tmp_path, scan, path, words) -> None:
    cfg = tmp_path / "mxrules.yaml"
    cfg.write_text(yaml.safe_dump({"scan": scan}))
    with pytest.raises(ConfigError) as err:
        load(str(cfg))
    [problem] = err.value.problems
    assert problem.path == path and words in problem.message, problem
    assert problem.file.startswith(f"{cfg}:")


@pytest.mark.parametrize(("scan", "expected"), [
    pytest.param({}, (4, 120.0), id="defaults"),
    pytest.param({"concurrency": 1, "wait_timeout": 0}, (1, 0.0), id="no-waiting"),
    pytest.param({"concurrency": 32, "wait_timeout": 30, "timeout": 240}, (32, 30.0),
                 id="limits"),
])
def test_scan_slots_settings(tmp_path, scan, expected) -> None:
    cfg = tmp_path / "mxrules.yaml"
    cfg.write_text(yaml.safe_dump({"scan": scan}))
    settings = load(str(cfg)).scan
    assert (settings.concurrency, settings.wait_timeout) == expected


@pytest.mark.parametrize(("text", "mode"), [
    pytest.param("", "always", id="default-as-ses"),
    pytest.param("scan: {authentication: scan_enabled}\n", "scan_enabled", id="per-rule"),
    pytest.param("scan: {authentication: never}\n", "never", id="never"),
])
def test_authentication_setting(tmp_path, text: str, mode: str) -> None:
    assert load(_write(tmp_path, text)).scan.authentication == mode


@pytest.mark.parametrize("value", [
    pytest.param("off", id="yaml-false"), pytest.param("sometimes", id="unknown"),
])
def test_authentication_setting_refuses_other_values(tmp_path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, f"scan: {{authentication: {value}}}\n"))
    [problem] = err.value.problems
    assert problem.path == "scan.authentication" and "is not one of" in problem.message
