"""Recipient matching and managed domains (docs/ses-compatibility.md, "Recipient matching")."""

from __future__ import annotations

import textwrap

import pytest

from mxrules.config import load
from mxrules.decision import Engine
from mxrules.matching import ManagedDomains, RecipientIndex, bare, parent_domains, split_address
from mxrules.rules import Rule


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        pytest.param("user@example.com", ("user", "example.com"), id="plain"),
        pytest.param("<User@Example.COM>", ("User", "example.com"), id="brackets-domain-folded"),
        pytest.param(" user@example.com. ", ("user", "example.com"), id="trailing-dot-and-space"),
        pytest.param('"a@b"@example.com', ('"a@b"', "example.com"), id="quoted-local-with-at"),
        pytest.param("postmaster", None, id="no-domain"),
        pytest.param("@example.com", None, id="no-local-part"),
        pytest.param("user@", None, id="empty-domain"),
        pytest.param("<>", None, id="null-sender"),
    ],
)
def test_split_address(address: str, expected: tuple[str, str] | None) -> None:
    assert split_address(address) == expected


def test_parent_domains() -> None:
    assert list(parent_domains("a.b.example.com")) == ["b.example.com", "example.com", "com"]
    assert list(parent_domains("localhost")) == []


@pytest.mark.parametrize(
    ("entries", "domain", "managed"),
    [
        pytest.param(["example.com"], "example.com", True, id="exact"),
        pytest.param(["example.com"], "EXAMPLE.Com", True, id="exact-any-case"),
        pytest.param(["Example.COM."], "example.com", True, id="entry-case-and-dot-folded"),
        pytest.param(["example.com"], "example.com.", True, id="trailing-dot"),
        pytest.param(["example.com"], "mail.example.com", False, id="exact-not-subdomain"),
        pytest.param(["example.com"], "badexample.com", False, id="exact-not-suffix"),
        pytest.param([".example.com"], "mail.example.com", True, id="dot-subdomain"),
        pytest.param([".example.com"], "a.b.Example.com", True, id="dot-deep-subdomain"),
        pytest.param([".example.com"], "example.com", False, id="dot-not-domain-itself"),
        pytest.param([".example.com"], "mailexample.com", False, id="dot-not-suffix"),
        pytest.param(["example.com", ".example.com"], "example.com", True, id="both-forms"),
        pytest.param([], "example.com", False, id="nothing-managed"),
    ],
)
def test_managed_domains(entries: list[str], domain: str, managed: bool) -> None:
    assert (domain in ManagedDomains(entries)) is managed


def test_managed_domains_bool_and_entries() -> None:
    assert not ManagedDomains([])
    domains = ManagedDomains(["b.com", ".A.com", "a.com"])
    assert domains
    assert domains.entries() == ["a.com", "b.com", ".a.com"]


def _rule(name: str, *recipients: str, enabled: bool = True) -> Rule:
    return Rule(name=name, enabled=enabled, recipients=tuple(recipients))


RULES = (
    _rule("address", "info@example.com"),
    _rule("domain", "example.net"),
    _rule("subdomains", ".example.org"),
    _rule("disabled", "info@example.com", "example.net", ".example.org", enabled=False),
    _rule("mixed-case", "Sales@Example.COM"),
    _rule("plus-condition", "list+tag@example.com"),
)


@pytest.mark.parametrize(
    ("recipient", "names"),
    [
        pytest.param("info@example.com", ["address"], id="full-address"),
        pytest.param("<info@example.com>", ["address"], id="full-address-in-brackets"),
        pytest.param("info+news@example.com", ["address"], id="plus-label"),
        pytest.param("info+a+b@example.com", ["address"], id="plus-label-with-plus"),
        pytest.param("info+@example.com", ["address"], id="empty-plus-label"),
        pytest.param("+info@example.com", [], id="leading-plus-is-not-a-label"),
        pytest.param("infos@example.com", [], id="longer-local-part"),
        pytest.param("info@mail.example.com", [], id="address-not-at-subdomain"),
        pytest.param("INFO@EXAMPLE.COM", ["address"], id="address-case-insensitive"),
        pytest.param("Info+X@Example.Com", ["address"], id="plus-label-case-insensitive"),
        pytest.param("sales@example.com", ["mixed-case"], id="condition-case-folded"),
        pytest.param("anyone@example.net", ["domain"], id="domain-exact"),
        pytest.param("anyone@EXAMPLE.NET", ["domain"], id="domain-case-insensitive"),
        pytest.param("anyone@example.net.", ["domain"], id="domain-trailing-dot"),
        pytest.param("anyone@sub.example.net", [], id="domain-not-subdomain"),
        pytest.param("anyone@sub.example.org", ["subdomains"], id="dot-subdomain"),
        pytest.param("anyone@a.b.EXAMPLE.org", ["subdomains"], id="dot-deep-subdomain"),
        pytest.param("anyone@example.org", [], id="dot-not-domain-itself"),
        pytest.param("anyone@notexample.org", [], id="dot-not-suffix"),
        pytest.param("list+tag@example.com", ["plus-condition"], id="plus-in-condition-exact"),
        pytest.param("list@example.com", [], id="plus-condition-needs-its-label"),
        pytest.param("postmaster", [], id="no-domain"),
    ],
)
def test_recipient_index(recipient: str, names: list[str]) -> None:
    index = RecipientIndex(RULES)
    assert [RULES[i].name for i in index.match(recipient)] == names


@pytest.mark.parametrize(
    ("recipient", "names"),
    [
        pytest.param("Sales@example.com", ["mixed-case"], id="exact-case"),
        pytest.param("Sales@EXAMPLE.com", ["mixed-case"], id="domain-still-insensitive"),
        pytest.param("sales@example.com", [], id="other-case-local-part"),
        pytest.param("Sales+x@example.com", ["mixed-case"], id="plus-label"),
        pytest.param("SALES+x@example.com", [], id="plus-label-other-case"),
        pytest.param("INFO@example.com", [], id="lowercase-condition-uppercase-rcpt"),
        pytest.param("anyone@EXAMPLE.NET", ["domain"], id="domain-condition-unaffected"),
    ],
)
def test_recipient_index_case_sensitive_local_part(recipient: str, names: list[str]) -> None:
    index = RecipientIndex(RULES, case_sensitive_local=True)
    assert [RULES[i].name for i in index.match(recipient)] == names


def test_rule_without_recipients_matches_every_address() -> None:
    rules = (_rule("first", "info@example.com"), _rule("catch-all"), _rule("off", enabled=False))
    index = RecipientIndex(rules)
    assert index.match("info@example.com") == [0, 1]
    assert index.match("who@else.example") == [1]
    assert index.match("postmaster") == []


def test_several_rules_match_in_rule_set_order() -> None:
    rules = (
        _rule("subdomains", ".example.com"),
        _rule("address", "a@x.example.com"),
        _rule("domain", "x.example.com"),
        _rule("twice", "a@x.example.com", "x.example.com"),  # listed once, not twice
        _rule("unrelated", "y.example.com"),
        _rule("catch-all"),
    )
    index = RecipientIndex(rules)
    assert index.match("a+t@x.example.com") == [0, 1, 2, 3, 5]
    assert index.match("b@x.example.com") == [0, 2, 3, 5]


# -- through a real config and the Engine: managed vs unmanaged ---------------------

def _engine(tmp_path, body: str) -> Engine:
    path = tmp_path / "mxrules.yaml"
    path.write_text("hostname: mx.example.com\n" + textwrap.dedent(body))
    return Engine(load(str(path)))


CONFIG = """\
domains: [example.com, .example.org, Example.NET]
rule_sets:
  default:
    - name: info
      enabled: true
      recipients: [info@example.com]
    - name: all-of-net
      enabled: true
      recipients: [example.net]
    - name: switched-off
      recipients: [off@example.com]
    - name: sub-org
      enabled: true
      recipients: [.example.org]
    - name: info-again
      enabled: true
      recipients: [INFO@example.com, info@EXAMPLE.net]
"""


@pytest.mark.parametrize(
    ("recipient", "outcome", "rules"),
    [
        pytest.param("info@example.com", "accepted", ("info", "info-again"),
                     id="two-rules-in-order"),
        pytest.param("info@example.net", "accepted", ("all-of-net", "info-again"),
                     id="domain-and-address"),
        pytest.param("x@EXAMPLE.net", "accepted", ("all-of-net",), id="managed-any-case"),
        pytest.param("off@example.com", "no-rule", (), id="disabled-rule-ignored"),
        pytest.param("nobody@example.com", "no-rule", (), id="managed-no-rule"),
        pytest.param("x@a.example.org", "accepted", ("sub-org",), id="managed-subdomain"),
        pytest.param("x@example.org", "unmanaged", (), id="dot-entry-not-domain-itself"),
        pytest.param("x@sub.example.com", "unmanaged", (), id="exact-entry-not-subdomain"),
        pytest.param("x@elsewhere.test", "unmanaged", (), id="other-domain"),
    ],
)
def test_engine_recipient_outcomes(tmp_path, recipient: str, outcome: str,
                                   rules: tuple[str, ...]) -> None:
    decision = _engine(tmp_path, CONFIG).rcpt(recipient, tls=False)
    assert (decision.outcome, decision.rules) == (outcome, rules)


def test_rule_without_recipients_matches_every_managed_recipient_only(tmp_path) -> None:
    engine = _engine(tmp_path, """\
        domains: [example.com]
        rule_sets:
          default:
            - name: everything
              enabled: true
        """)
    assert engine.rcpt("anyone@example.com", tls=False).rules == ("everything",)
    assert engine.rcpt("anyone@Example.COM", tls=False).handled
    assert engine.rcpt("anyone@other.test", tls=False).outcome == "unmanaged"


def test_local_part_case_sensitive_config(tmp_path) -> None:
    body = """\
        rule_sets:
          default:
            - name: exact
              enabled: true
              recipients: [Info@example.com]
        """
    insensitive = _engine(tmp_path, body)
    assert insensitive.rcpt("info@example.com", tls=False).outcome == "accepted"
    sensitive = _engine(tmp_path, "local_part_case_sensitive: true\n" + textwrap.dedent(body))
    assert sensitive.rcpt("Info@EXAMPLE.com", tls=False).outcome == "accepted"
    assert sensitive.rcpt("info@example.com", tls=False).outcome == "no-rule"


def test_domains_default_to_those_the_rules_name(tmp_path) -> None:
    engine = _engine(tmp_path, """\
        rule_sets:
          default:
            - name: one
              enabled: true
              recipients: [a@Example.com, .Example.org, example.net]
        """)
    assert engine.config.domains == (".example.org", "example.com", "example.net")
    assert engine.rcpt("b@example.com", tls=False).outcome == "no-rule"
    assert engine.rcpt("b@x.example.org", tls=False).outcome == "accepted"
    assert engine.rcpt("b@example.org", tls=False).outcome == "unmanaged"


# One `<>` rule for every caller: the milter's MAIL and RCPT, SMTP reply texts, the
# stored copy's returnPath, `explain`'s RCPT line and split_address all go through bare.
@pytest.mark.parametrize(
    ("address", "expected"),
    [
        pytest.param("<a@b.c>", "a@b.c", id="brackets"),
        pytest.param(" a@b.c ", "a@b.c", id="spaces"),
        pytest.param(" <a@b.c> ", "a@b.c", id="spaces-around-brackets"),
        pytest.param("< a@b.c >", " a@b.c ", id="spaces-inside-kept"),
        pytest.param("<>", "", id="null"),
        pytest.param("a@b.c", "a@b.c", id="plain"),
        pytest.param("<a@b.c", "<a@b.c", id="open-only"),
        pytest.param("a@b.c>", "a@b.c>", id="close-only"),
        # explain used str.strip("<>"), which took every bracket off both ends.
        pytest.param("<<a@b.c>>", "<a@b.c>", id="one-pair-only"),
    ],
)
def test_bare(address: str, expected: str) -> None:
    assert bare(address) == expected
