"""Issue acceptance for receiving: a real Postfix with the real mxrules milter.

Every test that takes `stack` runs twice, with the rules written as YAML and
as SES's JSON exports (see conftest.py).
"""

from __future__ import annotations

import email
import os
import subprocess
from email import policy
from typing import Any

import pytest

from harness.mxrules_proc import MXRULES
from harness.stack import RULES, Stack, message, write_config

pytestmark = pytest.mark.postfix


def code(reply: tuple[int, Any]) -> int:
    return reply[0]


def text(reply: tuple[int, Any]) -> str:
    t = reply[1]
    return t.decode(errors="replace") if isinstance(t, bytes) else str(t)


def test_matched_accepted_unmatched_550_unmanaged_untouched(stack: Stack) -> None:
    rcpts = ["user@example.com", "nobody@example.com", "off@example.com",
             "x@deep.sub.example.com", "friend@other.test", "a@sub.example.com"]
    r = stack.send(rcpts)
    assert code(r.rcpts["user@example.com"]) == 250
    assert code(r.rcpts["x@deep.sub.example.com"]) == 250
    for refused in ("nobody@example.com", "off@example.com"):  # no rule / rule disabled
        assert code(r.rcpts[refused]) == 550
        assert "5.1.1" in text(r.rcpts[refused])
    # Outside the managed domains (sub.example.com itself is not: only .sub.example.com).
    assert code(r.rcpts["friend@other.test"]) == 250
    assert code(r.rcpts["a@sub.example.com"]) == 250
    assert r.data is not None and code(r.data) == 250

    # consume: the handled recipients were removed from Postfix's copy; the others go on.
    stack.sink.wait_for(1)
    assert sorted(stack.sink.messages[0].rcpt_tos) == ["a@sub.example.com", "friend@other.test"]

    [(_, job)] = stack.jobs()
    assert job.recipients == ("user@example.com", "x@deep.sub.example.com")
    assert [(m.rule.name, m.recipients) for m in job.rules] == [
        ("store", ("user@example.com", "x@deep.sub.example.com")),
        ("second", ("user@example.com",)),
    ]
    assert job.mail_from == "a@sender.test"
    assert job.rule_set == "default"
    assert stack.milter.problems() == []


def test_ip_filters_and_blocklist_at_connect(stack: Stack) -> None:
    outcomes = {}
    for ip in ("192.0.2.9", "192.0.2.7", "198.51.100.20", "203.0.113.5"):
        r = stack.send(["user@example.com"], client_ip=ip)
        outcomes[ip] = r
    for blocked in ("192.0.2.9", "198.51.100.20"):
        r = outcomes[blocked]
        # Postfix answers XCLIENT with a new greeting: "554 ... not accepting connections".
        replies = [r.xclient, r.mail, *r.rcpts.values()]
        assert any(code(x) == 554 for x in replies if x), (blocked, r)
        assert r.data is None or code(r.data) != 250
    # 192.0.2.7 is inside the blocked 192.0.2.0/24 but has its own Allow filter: Allow wins.
    for allowed in ("192.0.2.7", "203.0.113.5"):
        assert outcomes[allowed].data is not None and code(outcomes[allowed].data) == 250
    jobs = stack.jobs()
    assert sorted(j.client.address for _, j in jobs) == ["192.0.2.7", "203.0.113.5"]
    log = stack.milter.log()
    assert "client=192.0.2.9 result=reject reason=block-filter filter=bad-net" in log
    assert "client=198.51.100.20 result=reject reason=blocklist" in log


def test_tls_required_rule(stack: Stack) -> None:
    plain = stack.send(["a@tls.example.com"])
    assert code(plain.rcpts["a@tls.example.com"]) == 530
    assert "5.7.0" in text(plain.rcpts["a@tls.example.com"])
    secure = stack.send(["a@tls.example.com"], tls=True)
    assert code(secure.rcpts["a@tls.example.com"]) == 250
    assert secure.data is not None and code(secure.data) == 250
    [(_, job)] = stack.jobs()
    assert job.client.tls_version.startswith("TLS")
    assert [m.rule.name for m in job.rules] == ["secure"]


def test_consume_discards_postfix_copy(stack: Stack) -> None:
    r = stack.send(["user@example.com"])
    assert r.data is not None and code(r.data) == 250
    stack.postfix.wait_for_log(r"milter-discard")
    assert stack.postfix.queue_empty()
    assert stack.sink.messages == []
    [(job_id, job)] = stack.jobs()
    assert job.message_id == job_id
    assert job.message_id in stack.milter.log()


def test_deliver_mode_adds_headers_in_order_and_job_matches(make_stack: Any,
                                                           rules_source: str) -> None:
    stack: Stack = make_stack(rules_source, delivery="deliver")
    sent = message("a@sender.test", ["user@example.com"], subject="deliver me")
    r = stack.send(["user@example.com"], sent)
    assert r.data is not None and code(r.data) == 250
    stack.sink.wait_for(1)
    delivered = stack.sink.messages[0]
    assert delivered.rcpt_tos == ("user@example.com",)
    parsed = email.message_from_bytes(delivered.data, policy=policy.compat32)
    names = [k for k, _ in parsed.items()]
    # Postfix's own Received first, then SPF/DKIM/DMARC's headers (every message is
    # authenticated, as in SES), the AddHeader actions in rule-set order, then the
    # message's own headers.
    assert names[:5] == ["Received", "Received-SPF", "Authentication-Results", "X-First",
                         "X-Second"], names
    assert parsed["X-First"] == "one" and parsed["X-Second"] == "two"
    assert names.count("Received") == 1 and "Return-Path" not in names[:5]

    [(job_id, job)] = stack.jobs()
    assert job.mail_from == "a@sender.test"
    assert job.recipients == ("user@example.com",)
    assert [(m.rule.name, m.recipients) for m in job.rules] == [
        ("store", ("user@example.com",)), ("second", ("user@example.com",))]
    assert job.in_stream_headers == (*job.auth_headers, ("X-First", "one"), ("X-Second", "two"))
    assert [n for n, _ in job.auth_headers] == ["Received-SPF", "Authentication-Results"]
    assert job.rules[0].rule.to_config() == {
        **RULES[0], "tls_policy": "Optional", "scan_enabled": False}
    with open(stack.spool.message_path("incoming", job_id), "rb") as fh:
        stored = fh.read()
    # The stored message is the one the client sent, as Postfix passed it on.
    assert stored.endswith(sent), stored[:500]
    assert job.message_size == len(stored)


def test_milter_killed_means_4xx(stack: Stack) -> None:
    stack.milter.kill()
    r = stack.send(["user@example.com"])
    replies = [r.connect, r.mail, *r.rcpts.values(), r.data]
    codes = [code(x) for x in replies if x is not None]
    assert any(400 <= c < 500 for c in codes), r
    assert not any(c == 250 for c in codes[-1:]), r
    assert stack.jobs() == []


def test_unusable_spool_answers_451_and_recovers(stack: Stack) -> None:
    root = stack.dir / "spool"
    moved = stack.dir / "spool.away"
    root.rename(moved)
    root.write_text("not a directory")  # the spool path is now a plain file
    try:
        r = stack.send(["user@example.com"])
        assert r.data is not None and code(r.data) == 451, r
        assert "4.3.0" in text(r.data)
    finally:
        root.unlink()
        moved.rename(root)
    assert stack.milter.proc is not None and stack.milter.proc.poll() is None
    again = stack.send(["user@example.com"])
    assert again.data is not None and code(again.data) == 250
    assert len(stack.jobs()) == 1
    assert os.listdir(root / "tmp") == []


def test_reload_applies_good_config_and_keeps_old_on_error(stack: Stack) -> None:
    new_rule = {"name": "late", "enabled": True, "recipients": ["late@example.com"]}
    mark = len(stack.milter.log())
    stack.rewrite_config(rules=[*RULES, new_rule])
    stack.milter.wait_for_log(r"config reloaded", after=mark)
    r = stack.send(["late@example.com"])
    assert code(r.rcpts["late@example.com"]) == 250

    broken = [*RULES, new_rule, {"name": "bad", "enabled": True,
                                 "actions": [{"no_such_action": {}}]}]
    mark = len(stack.milter.log())
    stack.rewrite_config(rules=broken)
    line = stack.milter.wait_for_log(r"reload rejected.*", after=mark).group(0)
    assert "old config stays in force" in line
    r = stack.send(["late@example.com", "user@example.com"])
    assert code(r.rcpts["late@example.com"]) == 250
    assert code(r.rcpts["user@example.com"]) == 250
    assert r.data is not None and code(r.data) == 250


@pytest.mark.parametrize("rules, expect", [
    pytest.param([{"name": "x", "enabled": True, "actions": [{"teleport": {}}]}],
                 "rule_sets.default[0].actions[0]: unknown action 'teleport'", id="unknown-action"),
    pytest.param([{"name": "x" * 65}], "rule_sets.default[0].name", id="name-too-long"),
    pytest.param([{"name": "x", "actions": [{"add_header": {
        "header_name": "X-A", "header_value": "a\r\nBcc: victim@example.net"}}]}],
                 "header_value", id="header-injection"),
    pytest.param([{"name": "x"}, {"name": "x"}], "duplicate rule name 'x'", id="duplicate-rule"),
])
def test_bad_config_refused_at_start_with_exit_78(tmp_path: Any, rules: list[Any],
                                                  expect: str) -> None:
    path = write_config(tmp_path, rules=rules)
    for argv in (["check-config"], ["milter"]):
        proc = subprocess.run([MXRULES, *argv, "--config", str(path)], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 78, proc
        assert expect in proc.stderr, proc.stderr
        assert str(path) in proc.stderr


def test_bad_cidr_refused_at_start(tmp_path: Any) -> None:
    path = write_config(tmp_path, filters=[{"name": "f", "policy": "Block",
                                            "cidr": "10.0.0.300/8"}])
    proc = subprocess.run([MXRULES, "milter", "--config", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 78
    assert "ip_filters[0].cidr: not an address or CIDR" in proc.stderr


def test_30mb_message_streams_without_growing_memory(make_stack: Any) -> None:
    """Acceptance: a 30 MB message passes with the milter's peak RSS growing < 10 MB."""
    stack: Stack = make_stack("yaml")
    assert stack.milter.proc is not None
    pid = stack.milter.proc.pid
    warm = stack.send(["user@example.com"])
    assert warm.data is not None and code(warm.data) == 250

    def peak_kib() -> int:
        with open(f"/proc/{pid}/status") as fh:
            status = fh.read().splitlines()
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    before = peak_kib()
    line = b"y" * 76 + b"\r\n"
    big = message("a@sender.test", ["user@example.com"], body="") + line * (30 * 1024 * 1024
                                                                              // len(line))
    r = stack.send(["user@example.com"], big)
    assert r.data is not None and code(r.data) == 250
    growth_mib = (peak_kib() - before) / 1024
    assert growth_mib < 10, growth_mib
    sizes = sorted(job.message_size for _, job in stack.jobs())
    assert sizes[-1] >= 30 * 1024 * 1024
