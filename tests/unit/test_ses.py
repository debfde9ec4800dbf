"""SES's own exports loaded as they are, and `import-ses`.

What SES prints: docs/ses-compatibility.md, "SES exports".
"""

from __future__ import annotations

import copy
import json
import textwrap

import pytest

from mxrules import cli
from mxrules.config import load
from mxrules.errors import ConfigError
from mxrules.rules import (
    AddHeaderAction,
    BounceAction,
    IpFilter,
    LambdaAction,
    Rule,
    RuleSet,
    S3Action,
    SNSAction,
    StopAction,
)
from mxrules.ses import filters_from_ses, read_json, rule_set_from_ses, ses_path

ACCOUNT = "123456789012"

# `aws ses describe-active-receipt-rule-set`, as the CLI prints it.
RULE_SET = {
    "Metadata": {"Name": "default-rule-set", "CreatedTimestamp": "2024-05-01T10:00:00.000Z"},
    "Rules": [
        {
            "Name": "store-and-notify",
            "Enabled": True,
            "TlsPolicy": "Require",
            "Recipients": ["info@example.com", ".example.org"],
            "Actions": [
                {"AddHeaderAction": {"HeaderName": "X-Mx-Rule",
                                     "HeaderValue": "store-and-notify"}},
                {"S3Action": {
                    "BucketName": "incoming-mail",
                    "ObjectKeyPrefix": "inbox/",
                    "KmsKeyArn": f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0a1b2c3d",
                    "TopicArn": f"arn:aws:sns:us-east-1:{ACCOUNT}:stored",
                    "IamRoleArn": f"arn:aws:iam::{ACCOUNT}:role/ses-s3",
                }},
                {"SNSAction": {"TopicArn": f"arn:aws:sns:us-east-1:{ACCOUNT}:mail",
                               "Encoding": "Base64"}},
                {"LambdaAction": {
                    "FunctionArn": f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:filter",
                    "InvocationType": "RequestResponse",
                    "TopicArn": f"arn:aws:sns:us-east-1:{ACCOUNT}:lambda",
                }},
                {"StopAction": {"Scope": "RuleSet",
                                "TopicArn": f"arn:aws:sns:us-east-1:{ACCOUNT}:stopped"}},
            ],
            "ScanEnabled": True,
        },
        {
            "Name": "bounce-old",
            "Enabled": False,
            "TlsPolicy": "Optional",
            "Recipients": ["old@example.com"],
            "Actions": [
                {"BounceAction": {
                    "SmtpReplyCode": "550",
                    "StatusCode": "5.1.1",
                    "Message": "Mailbox does not exist",
                    "Sender": "postmaster@example.com",
                    "TopicArn": f"arn:aws:sns:us-east-1:{ACCOUNT}:bounced",
                }},
            ],
            "ScanEnabled": False,
        },
        {
            "Name": "event-lambda",
            "Enabled": True,
            "TlsPolicy": "Optional",
            "Actions": [
                {"LambdaAction": {
                    "FunctionArn": f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:log",
                    "InvocationType": "Event"}},
                {"SNSAction": {"TopicArn": f"arn:aws:sns:us-east-1:{ACCOUNT}:mail",
                               "Encoding": "UTF-8"}},
            ],
            "ScanEnabled": False,
        },
    ],
}

# `aws ses list-receipt-filters`.
FILTERS = {
    "Filters": [
        {"Name": "office", "IpFilter": {"Policy": "Allow", "Cidr": "10.0.0.1/24"}},
        {"Name": "bad-net", "IpFilter": {"Policy": "Block", "Cidr": "198.51.100.0/24"}},
        {"Name": "v6-host", "IpFilter": {"Policy": "Block", "Cidr": "2001:db8::bad"}},
    ]
}

# The same, written by hand in mxrules' YAML.
EQUIVALENT_YAML = f"""\
hostname: mx.example.com
active_rule_set: default-rule-set
rule_sets:
  default-rule-set:
    - name: store-and-notify
      enabled: true
      tls_policy: Require
      recipients: [info@example.com, .example.org]
      scan_enabled: true
      actions:
        - add_header: {{header_name: X-Mx-Rule, header_value: store-and-notify}}
        - s3:
            bucket_name: incoming-mail
            object_key_prefix: inbox/
            kms_key_arn: "arn:aws:kms:us-east-1:{ACCOUNT}:key/0a1b2c3d"
            topic_arn: "arn:aws:sns:us-east-1:{ACCOUNT}:stored"
        - sns: {{topic_arn: "arn:aws:sns:us-east-1:{ACCOUNT}:mail", encoding: Base64}}
        - lambda:
            function_arn: "arn:aws:lambda:us-east-1:{ACCOUNT}:function:filter"
            invocation_type: RequestResponse
            topic_arn: "arn:aws:sns:us-east-1:{ACCOUNT}:lambda"
        - stop: {{scope: RuleSet, topic_arn: "arn:aws:sns:us-east-1:{ACCOUNT}:stopped"}}
    - name: bounce-old
      recipients: [old@example.com]
      actions:
        - bounce:
            smtp_reply_code: "550"
            status_code: "5.1.1"
            message: Mailbox does not exist
            sender: postmaster@example.com
            topic_arn: "arn:aws:sns:us-east-1:{ACCOUNT}:bounced"
    - name: event-lambda
      enabled: true
      actions:
        - lambda: {{function_arn: "arn:aws:lambda:us-east-1:{ACCOUNT}:function:log"}}
        - sns: {{topic_arn: "arn:aws:sns:us-east-1:{ACCOUNT}:mail"}}
ip_filters:
  - {{name: office, policy: Allow, cidr: 10.0.0.1/24}}
  - {{name: bad-net, policy: Block, cidr: 198.51.100.0/24}}
  - {{name: v6-host, policy: Block, cidr: "2001:db8::bad"}}
"""

EXPECTED_RULES = (
    Rule(
        name="store-and-notify", enabled=True, tls_policy="Require", scan_enabled=True,
        recipients=("info@example.com", ".example.org"),
        actions=(
            AddHeaderAction(header_name="X-Mx-Rule", header_value="store-and-notify"),
            S3Action(bucket_name="incoming-mail", object_key_prefix="inbox/",
                     kms_key_arn=f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0a1b2c3d",
                     topic_arn=f"arn:aws:sns:us-east-1:{ACCOUNT}:stored"),
            SNSAction(topic_arn=f"arn:aws:sns:us-east-1:{ACCOUNT}:mail", encoding="Base64"),
            LambdaAction(function_arn=f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:filter",
                         invocation_type="RequestResponse",
                         topic_arn=f"arn:aws:sns:us-east-1:{ACCOUNT}:lambda"),
            StopAction(scope="RuleSet", topic_arn=f"arn:aws:sns:us-east-1:{ACCOUNT}:stopped"),
        )),
    Rule(
        name="bounce-old", enabled=False, recipients=("old@example.com",),
        actions=(BounceAction(smtp_reply_code="550", status_code="5.1.1",
                              message="Mailbox does not exist", sender="postmaster@example.com",
                              topic_arn=f"arn:aws:sns:us-east-1:{ACCOUNT}:bounced"),)),
    Rule(
        name="event-lambda", enabled=True,
        actions=(LambdaAction(function_arn=f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:log",
                              invocation_type="Event"),
                 SNSAction(topic_arn=f"arn:aws:sns:us-east-1:{ACCOUNT}:mail",
                           encoding="UTF-8"))),
)
EXPECTED_FILTERS = (
    IpFilter("office", "Allow", "10.0.0.1/24"),
    IpFilter("bad-net", "Block", "198.51.100.0/24"),
    IpFilter("v6-host", "Block", "2001:db8::bad"),
)


def _exports(tmp_path, rule_set=RULE_SET, filters=FILTERS) -> tuple[str, str]:
    rs = tmp_path / "ruleset.json"
    rs.write_text(json.dumps(rule_set, indent=4))
    fl = tmp_path / "filters.json"
    fl.write_text(json.dumps(filters, indent=4))
    return str(rs), str(fl)


def _ses_config(tmp_path, rule_set=RULE_SET, filters=FILTERS) -> str:
    _exports(tmp_path, rule_set, filters)
    path = tmp_path / "mxrules.yaml"
    path.write_text("hostname: mx.example.com\nrule_set_file: ruleset.json\n"
                    "ip_filter_file: filters.json\n")
    return str(path)


def test_ses_exports_load_into_the_same_objects_as_yaml(tmp_path) -> None:
    from_ses = load(_ses_config(tmp_path))
    yaml_path = tmp_path / "equivalent.yaml"
    yaml_path.write_text(EQUIVALENT_YAML)
    from_yaml = load(str(yaml_path))

    assert from_ses.rule_sets == from_yaml.rule_sets
    assert from_ses.rule_sets == {"default-rule-set": RuleSet("default-rule-set",
                                                              EXPECTED_RULES)}
    assert from_ses.ip_filters == from_yaml.ip_filters == EXPECTED_FILTERS
    assert from_ses.active_rule_set == from_yaml.active_rule_set == "default-rule-set"
    assert from_ses.domains == from_yaml.domains == (".example.org", "example.com")
    assert from_ses.files == (str(tmp_path / "mxrules.yaml"), str(tmp_path / "ruleset.json"),
                              str(tmp_path / "filters.json"))


def test_ses_filters_join_the_yaml_ones(tmp_path) -> None:
    _exports(tmp_path)
    path = tmp_path / "mxrules.yaml"
    path.write_text("hostname: mx.example.com\nip_filter_file: filters.json\n"
                    "ip_filters: [{name: yaml-one, policy: Block, cidr: 192.0.2.1}]\n")
    assert load(str(path)).ip_filters == (IpFilter("yaml-one", "Block", "192.0.2.1"),
                                          *EXPECTED_FILTERS)


def test_rule_set_file_beside_a_yaml_rule_set(tmp_path) -> None:
    _exports(tmp_path)
    path = tmp_path / "mxrules.yaml"
    path.write_text("hostname: mx.example.com\nrule_set_file: ruleset.json\n"
                    "active_rule_set: local\nrule_sets:\n  local: [{name: a}]\n")
    cfg = load(str(path))
    assert sorted(cfg.rule_sets) == ["default-rule-set", "local"]
    assert cfg.active_rule_set == "local"


def test_import_ses_round_trip(tmp_path) -> None:
    rs, fl = _exports(tmp_path)
    text = cli.import_ses(rs, fl)
    assert text.startswith(f"# mxrules rules converted from the SES export {rs} and {fl}\n")
    out = tmp_path / "imported.yaml"
    out.write_text("hostname: mx.example.com\n" + text)
    imported = load(str(out))
    direct = load(_ses_config(tmp_path))
    assert imported.rule_sets == direct.rule_sets
    assert imported.rule_sets["default-rule-set"].rules == EXPECTED_RULES
    assert imported.ip_filters == direct.ip_filters == EXPECTED_FILTERS
    assert imported.active_rule_set == "default-rule-set"


def test_import_ses_without_filters(tmp_path) -> None:
    rs, _ = _exports(tmp_path)
    text = cli.import_ses(rs, None)
    assert "ip_filters" not in text
    out = tmp_path / "imported.yaml"
    out.write_text("hostname: mx.example.com\n" + text)
    assert load(str(out)).rule_sets["default-rule-set"].rules == EXPECTED_RULES


def test_rule_set_from_ses_converts_field_names() -> None:
    name, rules = rule_set_from_ses(RULE_SET, "rs.json")
    assert name == "default-rule-set"
    assert rules[0]["actions"][1] == {"s3": {
        "bucket_name": "incoming-mail", "object_key_prefix": "inbox/",
        "kms_key_arn": f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0a1b2c3d",
        "topic_arn": f"arn:aws:sns:us-east-1:{ACCOUNT}:stored"}}  # IamRoleArn dropped
    assert rules[1]["actions"][0]["bounce"]["smtp_reply_code"] == "550"
    assert filters_from_ses(FILTERS, "f.json")[0] == {
        "name": "office", "policy": "Allow", "cidr": "10.0.0.1/24"}


def _with(path: list, value) -> dict:
    """RULE_SET with the item at `path` replaced (or removed when value is ...)."""
    doc = copy.deepcopy(RULE_SET)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


WORKMAIL = {"WorkmailAction": {
    "OrganizationArn": f"arn:aws:workmail:us-east-1:{ACCOUNT}:organization/m-1"}}

SES_ERRORS = [
    pytest.param(_with(["Rules", 0, "Actions", 1, "S3Action", "BucketName"], "b"),
                 "Rules[0].Actions[1].S3Action.BucketName", "'b' is too short",
                 id="bucket-name-too-short"),
    pytest.param(_with(["Rules", 0, "Actions", 1, "S3Action", "KmsKeyArn"], "alias/x"),
                 "Rules[0].Actions[1].S3Action.KmsKeyArn", "is not valid: expected an ARN",
                 id="kms-key-not-an-arn"),
    pytest.param(_with(["Rules", 0, "Actions", 2, "SNSAction", "Encoding"], "base64"),
                 "Rules[0].Actions[2].SNSAction.Encoding", "'base64' is not one of: UTF-8, Base64",
                 id="sns-encoding-wrong-case"),
    pytest.param(_with(["Rules", 1, "Actions", 0, "BounceAction", "SmtpReplyCode"], "250"),
                 "Rules[1].Actions[0].BounceAction.SmtpReplyCode", "a 4xx or 5xx",
                 id="bounce-code"),
    pytest.param(_with(["Rules", 0, "Actions", 0, "AddHeaderAction", "HeaderValue"], "a\r\nb"),
                 "Rules[0].Actions[0].AddHeaderAction.HeaderValue", "no CR or LF",
                 id="header-value-crlf"),
    pytest.param(_with(["Rules", 0, "Actions", 0, "AddHeaderAction", "HeaderValue"], "a\0b"),
                 "Rules[0].Actions[0].AddHeaderAction.HeaderValue", "control character",
                 id="header-value-nul"),
    pytest.param(_with(["Rules", 1, "Actions", 0, "BounceAction", "Message"], "a\x1bb"),
                 "Rules[1].Actions[0].BounceAction.Message", "control character",
                 id="bounce-message-escape"),
    pytest.param(_with(["Rules", 2, "Actions", 0, "LambdaAction", "FunctionArn"], ...),
                 "Rules[2].Actions[0].LambdaAction", "'function_arn' is required",
                 id="lambda-without-function"),
    pytest.param(_with(["Rules", 0, "Actions", 1, "S3Action", "Bucket"], "x"),
                 "Rules[0].Actions[1].S3Action", "unknown key 'bucket'",
                 id="unknown-action-field"),
    pytest.param(_with(["Rules", 0, "Actions", 1], WORKMAIL),
                 "Rules[0].Actions[1]",
                 "WorkmailAction is not supported: Amazon WorkMail exists only inside AWS",
                 id="workmail-action"),
    pytest.param(_with(["Rules", 0, "Actions", 1], {"ForwardAction": {}}),
                 "Rules[0].Actions[1]", "unknown action 'ForwardAction'",
                 id="unknown-action"),
    pytest.param(_with(["Rules", 0, "Actions", 1], {"S3Action": {}, "SNSAction": {}}),
                 "Rules[0].Actions[1]", "an action must be one", id="two-actions-in-one"),
    pytest.param(_with(["Rules", 0, "Actions", 1, "S3Action"], "bucket"),
                 "Rules[0].Actions[1].S3Action", "must be an object", id="action-not-object"),
    pytest.param(_with(["Rules", 1, "Colour"], "blue"),
                 "Rules[1].Colour", "unknown rule field", id="unknown-rule-field"),
    pytest.param(_with(["Rules", 1, "Name"], "x" * 65),
                 "Rules[1].Name", "too long (65 characters, at most 64)", id="rule-name-too-long"),
    pytest.param(_with(["Rules", 1, "TlsPolicy"], "Required"),
                 "Rules[1].TlsPolicy", "'Required' is not one of: Require, Optional",
                 id="tls-policy"),
    pytest.param(_with(["Rules", 1, "Actions"], {"S3Action": {}}),
                 "Rules[1].Actions", "must be a list", id="actions-not-a-list"),
    pytest.param(_with(["Rules", 1], "rule"), "Rules[1]", "a rule must be an object",
                 id="rule-not-an-object"),
    pytest.param(_with(["Metadata"], ...), "Metadata.Name", "missing: the rule set needs a name",
                 id="no-metadata-name"),
]


@pytest.mark.parametrize(("doc", "path", "message"), SES_ERRORS)
def test_error_in_ses_rule_set_named_by_ses_path(tmp_path, capsys, doc: dict, path: str,
                                                 message: str) -> None:
    config = _ses_config(tmp_path, rule_set=doc)
    assert cli.main(["check-config", "--config", config]) == 78
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()
             if line.startswith(f"{tmp_path}/ruleset.json: {path}: ")]
    assert any(message in line for line in lines), err


@pytest.mark.parametrize(("doc", "path", "message"), SES_ERRORS)
def test_import_ses_reports_errors_by_ses_path(tmp_path, doc: dict, path: str,
                                               message: str) -> None:
    rs, fl = _exports(tmp_path, rule_set=doc)
    with pytest.raises(ConfigError) as info:
        cli.import_ses(rs, fl)
    assert any(p.file == rs and p.path == path and message in p.message
               for p in info.value.problems), info.value.problems


FILTER_ERRORS = [
    pytest.param({"Filters": [{"Name": "x",
                               "IpFilter": {"Policy": "Block", "Cidr": "10.0.0.300"}}]},
                 "Filters[0].IpFilter.Cidr", "not an address or CIDR", id="bad-cidr"),
    pytest.param({"Filters": [FILTERS["Filters"][0],
                              {"Name": "x", "IpFilter": {"Policy": "Deny", "Cidr": "10.0.0.1"}}]},
                 "Filters[1].IpFilter.Policy", "'Deny' is not one of: Allow, Block",
                 id="bad-policy"),
    pytest.param({"Filters": [{"Name": "bad name", "IpFilter": {"Policy": "Block",
                                                                "Cidr": "10.0.0.1"}}]},
                 "Filters[0].Name", "'bad name' is not valid", id="bad-name"),
    pytest.param({"Filters": [{"Name": "x"}]}, "Filters[0]", "needs Name and IpFilter",
                 id="no-ip-filter"),
    pytest.param({"Rules": []}, "", "not an SES receipt filter export", id="not-a-filter-export"),
]


@pytest.mark.parametrize(("doc", "path", "message"), FILTER_ERRORS)
def test_error_in_ses_filters_named_by_ses_path(tmp_path, doc: dict, path: str,
                                                message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(_ses_config(tmp_path, filters=doc))
    fl = str(tmp_path / "filters.json")
    assert any(p.file == fl and p.path == path and message in p.message
               for p in info.value.problems), info.value.problems


def test_ses_file_that_is_not_json(tmp_path, capsys) -> None:
    config = _ses_config(tmp_path)
    (tmp_path / "ruleset.json").write_text('{"Metadata": {"Name": "x"},\n "Rules": [,]}\n')
    assert cli.main(["check-config", "--config", config]) == 78
    err = capsys.readouterr().err
    assert f"{tmp_path}/ruleset.json: not valid JSON (line 2)" in err


def test_ses_file_missing(tmp_path, capsys) -> None:
    path = tmp_path / "mxrules.yaml"
    path.write_text("rule_set_file: nowhere.json\n")
    assert cli.main(["check-config", "--config", str(path)]) == 78
    assert f"{tmp_path}/nowhere.json: cannot read: No such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param([], id="a-list"),
        pytest.param({"Rules": {"Name": "x"}}, id="rules-not-a-list"),
    ],
)
def test_not_a_rule_set_export(doc) -> None:
    with pytest.raises(ConfigError) as info:
        rule_set_from_ses(doc, "rs.json")
    assert "not an SES rule set export" in str(info.value)


def test_rule_set_both_in_yaml_and_ses_file(tmp_path) -> None:
    _exports(tmp_path)
    path = tmp_path / "mxrules.yaml"
    path.write_text(textwrap.dedent("""\
        rule_set_file: ruleset.json
        active_rule_set: default-rule-set
        rule_sets:
          default-rule-set: [{name: a}]
        """))
    with pytest.raises(ConfigError) as info:
        load(str(path))
    (problem,) = info.value.problems
    assert problem.file == f"{path}:1"
    assert problem.path == "rule_set_file"
    assert "is also defined under rule_sets" in problem.message


def test_duplicate_rule_names_in_ses_file(tmp_path) -> None:
    doc = _with(["Rules", 2, "Name"], "store-and-notify")
    with pytest.raises(ConfigError) as info:
        load(_ses_config(tmp_path, rule_set=doc))
    (problem,) = info.value.problems
    assert (problem.file, problem.path) == (str(tmp_path / "ruleset.json"), "Rules[2].Name")
    assert "duplicate rule name 'store-and-notify'" in problem.message


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        pytest.param([0, "name"], "Rules[0].Name", id="rule-field"),
        pytest.param([1, "actions", 2, "s3", "bucket_name"],
                     "Rules[1].Actions[2].S3Action.BucketName", id="action-field"),
        pytest.param([0, "actions", 0, "sns"], "Rules[0].Actions[0].SNSAction", id="action"),
        pytest.param([0, "actions", 0, "add_header", "header_value"],
                     "Rules[0].Actions[0].AddHeaderAction.HeaderValue", id="add-header"),
        pytest.param([0, "tls_policy"], "Rules[0].TlsPolicy", id="tls"),
    ],
)
def test_ses_path(tokens: list, expected: str) -> None:
    assert ses_path(tokens) == expected


def test_read_json_errors(tmp_path) -> None:
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"Name": "\xe9"}')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_json(str(bad))
    assert read_json("inline", '{"a": 1}') == {"a": 1}
