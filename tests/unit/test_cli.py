"""The `mxrules` command line: check-config, explain, import-ses."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from harness.jobs import make_job
from mxrules import cli
from mxrules.config import load

CONFIG = """\
hostname: mx.example.com
domains: [example.com]
max_message_size: 2048
ip_filters:
  - {name: bad-net, policy: Block, cidr: 198.51.100.0/24}
  - {name: office, policy: Allow, cidr: 198.51.100.7}
rule_sets:
  default:
    - name: info
      enabled: true
      recipients: [info@example.com]
      scan_enabled: true
      actions:
        - add_header: {header_name: X-A, header_value: "1"}
        - s3: {bucket_name: bucket, object_key_prefix: in/,
               kms_key_arn: "arn:aws:kms:us-east-1:1:key/k"}
        - lambda: {function_arn: "arn:aws:lambda:us-east-1:1:function:f",
                   invocation_type: RequestResponse}
        - add_header: {header_name: X-B, header_value: "2"}
    - name: vault
      enabled: true
      tls_policy: Require
      recipients: [vault@example.com]
      actions:
        - bounce: {smtp_reply_code: "550", status_code: "5.1.1", message: gone,
                   sender: pm@example.com, topic_arn: "arn:aws:sns:us-east-1:1:t"}
        - stop: {scope: RuleSet}
"""


@pytest.fixture
def config(tmp_path) -> str:
    path = tmp_path / "mxrules.yaml"
    path.write_text(CONFIG)
    return str(path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["check-config", "--config", "{}"], id="option-after-command"),
        pytest.param(["--config", "{}", "check-config"], id="option-before-command"),
        pytest.param(["check-config", "-c", "{}"], id="short-option"),
    ],
)
def test_check_config_ok(capsys, config: str, argv: list[str]) -> None:
    code, out, err = _run(capsys, *[a.format(config) for a in argv])
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == [f"{config}: ok",
                                    "  rule sets: default (2 rules); active: default"]


def test_check_config_bad_exits_78(capsys, tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("delivery: keep\nmax_message_size: 10\n")
    code, out, err = _run(capsys, "check-config", "--config", str(path))
    assert (code, out) == (78, "")
    assert err.splitlines() == [
        f"{path}:1: delivery: 'keep' is not one of: consume, deliver",
        f"{path}:2: max_message_size: 10 is less than the minimum of 1024",
    ]


def test_explain_text(capsys, config: str) -> None:
    code, out, err = _run(capsys, "explain", "-c", config, "--client-ip", "192.0.2.1",
                          "--from", "s@sender.test", "--rcpt", "info@example.com",
                          "nobody@example.com", "vault@example.com", "x@other.test")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"config {config}, active rule set: default",
        "",
        "CONNECT from [192.0.2.1] TLS no",
        "  accept: no IP filter or blocklist matches",
        "MAIL FROM:<s@sender.test>",
        "  accept",
        "RCPT TO:<info@example.com>",
        "  accept: matched by info",
        "RCPT TO:<nobody@example.com>",
        "  REJECT 550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown",
        "  because no enabled rule of the active rule set matches it",
        "RCPT TO:<vault@example.com>",
        "  REJECT 530 5.7.0 Must issue a STARTTLS command first",
        "  because rule vault requires TLS (tls_policy: Require) and this session is not "
        "encrypted",
        "RCPT TO:<x@other.test>",
        "  not a managed domain: left to Postfix, untouched",
        "",
        "Actions, in the order they run:",
        "  rule info (recipients: info@example.com, scans on)",
        "    1. AddHeader X-A: 1",
        "    2. S3 put s3://bucket/in/<messageId> (SSE-KMS arn:aws:kms:us-east-1:1:key/k)",
        "    3. Lambda arn:aws:lambda:us-east-1:1:function:f (RequestResponse)",
        "    4. AddHeader X-B: 2",
        "Headers added to Postfix's copy at end of data: X-A: 1",
        "Scans (a matched rule has scan_enabled), within 60 s:",
        "  spam: no scanner configured (PROCESSING_FAILED)",
        "  virus: no scanner configured (PROCESSING_FAILED)",
        "  SPF, DKIM, DMARC: DNS the system resolver",
        "Delivery: consume: spooled; handled recipients removed from Postfix's copy, "
        "which goes on for the others",
    ]


def test_explain_json_with_tls(capsys, config: str) -> None:
    code, out, _ = _run(capsys, "explain", "-c", config, "--client-ip", "::ffff:192.0.2.1",
                        "--helo", "mail.sender.test", "--from", "", "--rcpt",
                        "<vault@example.com>", "info@example.com", "--tls", "--size", "100",
                        "--json")
    assert code == 0
    result = json.loads(out)
    assert result["connect"]["result"] == "accept"
    assert result["mail"] == {"sender": "", "size": 100, "reply": None}
    assert [(r["recipient"], r["outcome"], r["rules"]) for r in result["recipients"]] == [
        ("<vault@example.com>", "accepted", ["vault"]),
        ("info@example.com", "accepted", ["info"]),
    ]
    assert [(p["rule"], p["recipients"]) for p in result["plan"]] == [
        ("info", ["info@example.com"]), ("vault", ["<vault@example.com>"])]
    assert [a["type"] for a in result["plan"][1]["actions"]] == ["Bounce", "Stop"]
    assert result["plan"][1]["actions"][0]["describe"] == (
        'Bounce 550 5.1.1 "gone" from pm@example.com to the envelope sender; '
        "notify arn:aws:sns:us-east-1:1:t")
    assert result["in_stream_headers"] == [["X-A", "1"]]
    assert result["scans"] is True
    assert result["delivery"] == "consume: spooled; Postfix's copy is discarded"


@pytest.mark.parametrize(
    "rcpt_args",
    [
        pytest.param(["--rcpt", "info@example.com", "--rcpt", "<vault@example.com>"],
                     id="repeated"),
        pytest.param(["--rcpt", "info@example.com", "<vault@example.com>"], id="several-values"),
        pytest.param(["--rcpt", "info@example.com", "--rcpt", "<vault@example.com>",
                      "x@example.com"], id="both"),
    ],
)
def test_explain_keeps_every_recipient(capsys, config: str, rcpt_args: list[str]) -> None:
    code, out, _ = _run(capsys, "explain", "-c", config, "--client-ip", "192.0.2.1",
                        "--from", "a@b.test", *rcpt_args, "--json")
    assert code == 0
    wanted = [a for a in rcpt_args if a != "--rcpt"]
    assert [r["recipient"] for r in json.loads(out)["recipients"]] == wanted


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        pytest.param("", ["Scans: SPF, DKIM, DMARC only (spam and virus DISABLED: no matched "
                          "rule has scan_enabled), within 60 s:",
                          "  SPF, DKIM, DMARC: DNS the system resolver"], id="always"),
        pytest.param("scan:\n  authentication: scan_enabled\n",
                     ["Scans: no (no matched rule has scan_enabled; verdicts DISABLED)"],
                     id="per-rule"),
    ],
)
def test_explain_authentication_for_an_unscanned_rule(capsys, tmp_path, mode: str,
                                                      expected: list[str]) -> None:
    path = tmp_path / "mxrules.yaml"
    path.write_text(CONFIG + mode)
    code, out, _ = _run(capsys, "explain", "-c", str(path), "--client-ip", "192.0.2.1",
                        "--from", "s@sender.test", "--rcpt", "vault@example.com", "--tls")
    assert code == 0
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Scans"))
    assert lines[start:-1] == expected


@pytest.mark.parametrize(
    ("client", "result", "decided_by", "reply"),
    [
        pytest.param("198.51.100.9", "reject", "block-filter",
                     "554 5.7.1 Client host [198.51.100.9] blocked by IP address filter",
                     id="blocked"),
        pytest.param("198.51.100.7", "accept", "allow-filter", None, id="allow-wins"),
    ],
)
def test_explain_connect(capsys, config: str, client: str, result: str, decided_by: str,
                         reply: str | None) -> None:
    code, out, _ = _run(capsys, "explain", "-c", config, "--client-ip", client, "--from",
                        "s@x.test", "--rcpt", "info@example.com", "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["connect"]["result"], data["connect"]["decided_by"],
            data["connect"]["reply"]) == (result, decided_by, reply)
    assert ("recipients" in data) is (result == "accept")


def test_explain_size_too_big(capsys, config: str) -> None:
    code, out, _ = _run(capsys, "explain", "-c", config, "--client-ip", "192.0.2.1", "--from",
                        "s@x.test", "--rcpt", "info@example.com", "--size", "2049")
    assert code == 0
    assert out.splitlines()[-2:] == [
        "MAIL FROM:<s@x.test> SIZE=2049",
        "  REJECT 552 5.3.4 Message size exceeds fixed maximum message size",
    ]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        pytest.param("192.0.2.1", ["RCPT TO:<gone@example.com>",
                                   "  REJECT 550 5.1.1 No such user",
                                   "  because a Bounce is all that departed would do for it: "
                                   "refused now instead of accepted and bounced later, so no "
                                   "delivery status notification is sent"], id="refused"),
        pytest.param("192.0.2.250", ["RCPT TO:<gone@example.com>",
                                     "  accept: matched by departed"], id="trusted-forwarder"),
    ],
)
def test_explain_bounce_only_recipient(capsys, tmp_path, client: str,
                                       expected: list[str]) -> None:
    path = tmp_path / "mxrules.yaml"
    path.write_text(textwrap.dedent("""\
        domains: [example.com]
        trusted_forwarders: [192.0.2.250]
        rule_sets:
          default:
            - name: departed
              enabled: true
              recipients: [gone@example.com]
              actions:
                - bounce: {smtp_reply_code: "550", status_code: 5.1.1, message: No such user,
                           sender: pm@example.com}
        """))
    code, out, _ = _run(capsys, "explain", "-c", str(path), "--client-ip", client, "--from",
                        "s@x.test", "--rcpt", "gone@example.com")
    assert code == 0
    lines = out.splitlines()
    start = lines.index("RCPT TO:<gone@example.com>")
    assert lines[start:start + len(expected)] == expected


def test_explain_bad_client_ip_is_a_usage_error(capsys, config: str) -> None:
    code, out, err = _run(capsys, "explain", "-c", config, "--client-ip", "not-an-ip",
                          "--from", "s@x.test", "--rcpt", "info@example.com")
    assert (code, out) == (64, "")
    assert err.startswith("mxrules explain: 'not-an-ip' does not appear to be an IPv4 or IPv6")


def test_explain_with_a_bad_config_exits_78(capsys, tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rule_sets: {default: [{name: a, colour: red}]}\n")
    code, _, err = _run(capsys, "explain", "-c", str(path), "--client-ip", "192.0.2.1",
                        "--from", "s@x.test", "--rcpt", "a@example.com")
    assert code == 78
    assert f"{path}:1: rule_sets.default[0]: unknown key 'colour'" in err


def test_import_ses_prints_loadable_yaml(capsys, tmp_path) -> None:
    rule_set = tmp_path / "rs.json"
    rule_set.write_text(json.dumps({
        "Metadata": {"Name": "prod"},
        "Rules": [{"Name": "r1", "Enabled": True, "Recipients": ["a@example.com"],
                   "Actions": [{"S3Action": {"BucketName": "bucket"}}]}]}))
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"Filters": [
        {"Name": "f1", "IpFilter": {"Policy": "Block", "Cidr": "192.0.2.0/24"}}]}))
    code, out, err = _run(capsys, "import-ses", str(rule_set), str(filters))
    assert (code, err) == (0, "")
    path = tmp_path / "imported.yaml"
    path.write_text(out)
    cfg = load(str(path))
    assert cfg.active_rule_set == "prod"
    assert cfg.rule_sets["prod"].rules[0].actions[0].to_config() == {
        "s3": {"bucket_name": "bucket"}}
    assert cfg.ip_filters[0].cidr == "192.0.2.0/24"


def test_import_ses_with_an_unsupported_action_exits_78(capsys, tmp_path) -> None:
    rule_set = tmp_path / "rs.json"
    rule_set.write_text(json.dumps({
        "Metadata": {"Name": "prod"},
        "Rules": [{"Name": "r1", "Actions": [
            {"S3Action": {"BucketName": "bucket"}},
            {"WorkmailAction": {"OrganizationArn": "arn:aws:workmail:us-east-1:1:org/m"}}]}]}))
    code, out, err = _run(capsys, "import-ses", str(rule_set))
    assert (code, out) == (78, "")
    assert err == (f"{rule_set}: Rules[0].Actions[1]: WorkmailAction is not supported: "
                   "Amazon WorkMail exists only inside AWS\n")


def test_no_command_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_config_option_is_accepted_after_every_command(capsys) -> None:
    from pathlib import Path
    export = Path(__file__).resolve().parents[2] / "conf" / "ses-export" / "rule-set.json"
    assert cli.main(["import-ses", "--config", "/nonexistent.yaml", str(export)]) == 0
    assert "rule_sets:" in capsys.readouterr().out


# -- control characters never reach the terminal ---------------------------------------

RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _spooled_job(tmp_path, mail_from: str, last_error: str) -> tuple[str, str]:
    """A config whose spool holds one job, deferred, from `mail_from`; (config, job id)."""
    from mxrules.ids import new_message_id
    from mxrules.rules import Rule, S3Action
    from mxrules.spool import Client, MatchedRule, Spool, with_progress
    path = tmp_path / "spool.yaml"
    path.write_text(f"spool: {{directory: {tmp_path / 'spool'}}}\n")
    spool = Spool(str(tmp_path / "spool"))
    spool.ensure()
    message_id = new_message_id()
    rule = Rule(name="store", enabled=True, actions=(S3Action(bucket_name="b"),))
    job = make_job(message_id=message_id, queue_id="Q1", mail_from=mail_from,
                   recipients=(mail_from,),
                   client=Client(address="192.0.2.1", helo="h\x1b]0;title\x07"),
                   rules=(MatchedRule(rule, (mail_from,)),), message_size=1, message_sha256="")
    writer = spool.new_job(message_id)
    writer.write(b"m")
    writer.commit(with_progress(job, attempts=1, last_error=last_error, next_due=1.0))
    spool.move(message_id, "incoming", "deferred")
    return str(path), message_id


def test_every_command_escapes_control_characters(capsys, tmp_path, config: str) -> None:
    sender = '"evil\x1b[2J\x1b[1;1H"@sender.test'
    spool_config, job_id = _spooled_job(tmp_path, sender, "S3 action: other: a\x1b[31mb\nc")
    odd = tmp_path / "odd\x1b[2J.yaml"
    odd.write_text(CONFIG)
    rule_set = tmp_path / "rs.json"
    rule_set.write_text(json.dumps({"Metadata": {"Name": "prod"}, "Rules": [{
        "Name": "r1", "Enabled": True, "Recipients": ["a@example.com"],
        "Actions": [{"AddHeaderAction": {"HeaderName": "X-A",
                                         "HeaderValue": "v\u202ex"}}]}]}))
    runs = {
        "spool show": ["spool", "show", job_id, "-c", spool_config],
        "spool list": ["spool", "list", "-c", spool_config],
        "spool show --json": ["spool", "show", job_id, "--json", "-c", spool_config],
        "check-config": ["check-config", "-c", str(odd)],
        "check-config error": ["check-config", "-c", str(tmp_path / "missing\x1b[2J.yaml")],
        "explain": ["explain", "-c", config, "--client-ip", "192.0.2.1", "--helo",
                    "h\x1b[2J", "--from", sender, "--rcpt", "info@example.com"],
        "import-ses": ["import-ses", str(rule_set)],
    }
    outputs = {}
    for name, argv in runs.items():
        _, out, err = _run(capsys, *argv)
        assert not RAW_CONTROL.search(out + err), (name, out + err)
        outputs[name] = out + err
    assert '<"evil\\x1b[2J\\x1b[1;1H"@sender.test>' in outputs["spool show"]
    assert "helo=h\\x1b]0;title\\x07" in outputs["spool show"]
    assert "a\\x1b[31mb c" in outputs["spool list"]  # the line break is a space, as before
    assert "odd\\x1b[2J.yaml: ok" in outputs["check-config"]
    assert "missing\\x1b[2J.yaml" in outputs["check-config error"]
    assert "HELO h\\x1b[2J" in outputs["explain"]
    # import-ses stays YAML that loads to the same value, written with YAML's escapes.
    imported = tmp_path / "imported.yaml"
    imported.write_text(outputs["import-ses"])
    value = load(str(imported)).rule_sets["prod"].rules[0].actions[0].header_value
    assert value == "v\u202ex"


def test_usage_errors_escape_the_arguments_they_repeat(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["spool", "show", "a\x1b[2J", "b\x1b]0;x\x07"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: b\\x1b]0;x\\x07" in err
    assert not RAW_CONTROL.search(err), err
