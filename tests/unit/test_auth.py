"""The pure parts of the SPF/DKIM/DMARC check: status tables, DMARC logic, header values."""

from __future__ import annotations

import pytest

from mxrules.scan import Verdict
from mxrules.scan.auth import (
    DkimResult,
    DmarcRecord,
    DmarcResult,
    DnsSettings,
    SpfResult,
    aligned,
    ar_address,
    ar_value,
    authentication_results,
    author_domain,
    comment,
    dkim_verdict,
    dmarc_verdict,
    evaluate_dmarc,
    organizational_domain,
    parse_dmarc_record,
    parse_nameserver,
    received_spf,
    sanitize,
    spf_value,
    spf_verdict,
)

AID = "mx.example.net"
SPF_PASS = SpfResult("pass", "mailfrom", "alice@example.com", "example.com")
GOOD = DkimResult("pass", "example.com", "sel1", "AbCd/Ef+GhIjKl==")
BAD = DkimResult("fail", "example.com", "sel2", "ZyXwVuTsRq", "body hash mismatch")


# --------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(("code", "status"), [
    pytest.param("pass", "PASS", id="pass"),
    pytest.param("fail", "FAIL", id="fail"),
    pytest.param("softfail", "GRAY", id="softfail"),
    pytest.param("neutral", "GRAY", id="neutral"),
    pytest.param("none", "GRAY", id="none"),
    pytest.param("temperror", "PROCESSING_FAILED", id="temperror"),
    pytest.param("permerror", "PROCESSING_FAILED", id="permerror"),
])
def test_spf_status(code: str, status: str) -> None:
    result = SpfResult(code, "mailfrom", "a@example.com", "example.com")  # type: ignore[arg-type]
    assert spf_verdict(result).status == status


def test_spf_detail_carries_the_problem_on_one_line() -> None:
    result = SpfResult("permerror", "mailfrom", "a@example.com", "example.com",
                       "Unknown mechanism\r\nfound: moo")
    assert spf_verdict(result) == Verdict("PROCESSING_FAILED",
                                          "permerror: Unknown mechanism found: moo")


def _dkim(code: str) -> DkimResult:
    return DkimResult(code, "example.com", "s", "b")  # type: ignore[arg-type]


@pytest.mark.parametrize(("codes", "status"), [
    pytest.param([], "GRAY", id="no-signature"),
    pytest.param(["pass"], "PASS", id="one-pass"),
    pytest.param(["pass", "pass"], "PASS", id="all-pass"),
    pytest.param(["pass", "fail"], "FAIL", id="any-fail"),
    pytest.param(["permerror"], "FAIL", id="no-key-is-a-failure"),
    pytest.param(["pass", "temperror"], "PROCESSING_FAILED", id="dns-error"),
    pytest.param(["neutral"], "PROCESSING_FAILED", id="malformed-signature"),
    pytest.param(["temperror", "fail"], "FAIL", id="fail-wins-over-undecided"),
])
def test_dkim_status(codes: list[str], status: str) -> None:
    assert dkim_verdict([_dkim(c) for c in codes]).status == status


def test_dkim_detail_names_each_signature() -> None:
    assert dkim_verdict([GOOD, BAD]).detail == (
        "pass d=example.com s=sel1; fail d=example.com s=sel2 (body hash mismatch)")


REJECT = DmarcRecord(p="reject", sp="reject")


@pytest.mark.parametrize(("result", "status", "policy"), [
    pytest.param(DmarcResult("pass", "example.com", REJECT, "reject"), "PASS", None, id="pass"),
    pytest.param(DmarcResult("fail", "example.com", REJECT, "reject"), "FAIL", "reject",
                 id="fail-reject"),
    pytest.param(DmarcResult("fail", "example.com", DmarcRecord("quarantine", "quarantine"),
                             "quarantine"), "FAIL", "quarantine", id="fail-quarantine"),
    pytest.param(DmarcResult("fail", "example.com", DmarcRecord("none", "none"), "none"),
                 "GRAY", "none", id="fail-p-none-is-gray"),
    pytest.param(DmarcResult("none", "example.com"), "GRAY", None, id="no-record"),
    pytest.param(DmarcResult("temperror", "example.com"), "PROCESSING_FAILED", None,
                 id="temperror"),
    pytest.param(DmarcResult("permerror"), "PROCESSING_FAILED", None, id="no-from-domain"),
])
def test_dmarc_status(result: DmarcResult, status: str, policy: str | None) -> None:
    verdict, got_policy = dmarc_verdict(result)
    assert (verdict.status, got_policy) == (status, policy)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("192.0.2.53", ("192.0.2.53", 53), id="v4"),
    pytest.param("192.0.2.53:5353", ("192.0.2.53", 5353), id="v4-port"),
    pytest.param("2001:db8::53", ("2001:db8::53", 53), id="v6"),
    pytest.param("[2001:db8::53]:5353", ("2001:db8::53", 5353), id="v6-port"),
    pytest.param("[::1]", ("::1", 53), id="v6-brackets"),
])
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", [
    pytest.param("ns.example.com", id="name"),
    pytest.param("192.0.2.53:0", id="port-0"),
    pytest.param("192.0.2.53:99999", id="port-high"),
    pytest.param("192.0.2.53:dns", id="port-text"),
    pytest.param("[2001:db8::53", id="open-bracket"),
    pytest.param("", id="empty"),
])
def test_bad_nameserver(text: str) -> None:
    with pytest.raises(ValueError, match="bad name server"):
        parse_nameserver(text)


def test_dns_settings_validated_on_construction() -> None:
    assert DnsSettings().nameservers == ()
    with pytest.raises(ValueError):
        DnsSettings(nameservers=("not-an-ip",))
    with pytest.raises(ValueError):
        DnsSettings(timeout=0)
    with pytest.raises(ValueError, match="two ports"):
        DnsSettings(nameservers=("127.0.0.1:53", "127.0.0.1:5353"))


# --------------------------------------------------------------------------- DMARC


@pytest.mark.parametrize(("domain", "org"), [
    pytest.param("example.com", "example.com", id="registered"),
    pytest.param("mail.example.com", "example.com", id="subdomain"),
    pytest.param("a.b.example.co.uk", "example.co.uk", id="two-label-suffix"),
    pytest.param("Mail.Example.COM.", "example.com", id="case-and-dot"),
    pytest.param("mx.example.test", "example.test", id="unlisted-tld"),
    pytest.param("com", "com", id="suffix-itself"),
])
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


@pytest.mark.parametrize(("identifier", "from_domain", "mode", "expected"), [
    pytest.param("example.com", "example.com", "s", True, id="strict-same"),
    pytest.param("mail.example.com", "example.com", "s", False, id="strict-sub"),
    pytest.param("mail.example.com", "example.com", "r", True, id="relaxed-sub"),
    pytest.param("EXAMPLE.com", "mail.example.com", "r", True, id="relaxed-parent-case"),
    pytest.param("example.net", "example.com", "r", False, id="other-domain"),
    pytest.param("a.example.co.uk", "b.other.co.uk", "r", False, id="shared-suffix-only"),
    pytest.param("", "example.com", "r", False, id="empty"),
])
def test_aligned(identifier: str, from_domain: str, mode: str, expected: bool) -> None:
    assert aligned(identifier, from_domain, mode) is expected


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("v=DMARC1; p=reject", DmarcRecord("reject", "reject"), id="sp-defaults-to-p"),
    pytest.param("v=DMARC1;p=none;sp=quarantine;adkim=s;aspf=s;pct=50",
                 DmarcRecord("none", "quarantine", "s", "s"), id="all-tags"),
    pytest.param("v = DMARC1 ; P=Reject; SP=bogus", DmarcRecord("reject", "reject"),
                 id="case-space-bad-sp"),
    pytest.param("v=DMARC1; p=bogus; rua=mailto:d@example.com", DmarcRecord("none", "none"),
                 id="bad-p-with-rua-is-none"),
    pytest.param("v=DMARC1; p=bogus", None, id="bad-p-ignored"),
    pytest.param("v=spf1 -all", None, id="not-dmarc"),
    pytest.param("p=reject; v=DMARC1", None, id="version-not-first"),
])
def test_parse_dmarc_record(text: str, expected: DmarcRecord | None) -> None:
    assert parse_dmarc_record(text) == expected


def _spf(result: str, domain: str) -> SpfResult:
    return SpfResult(result, "mailfrom", f"bounce@{domain}", domain)  # type: ignore[arg-type]


@pytest.mark.parametrize(("record", "record_domain", "spf", "dkims", "expected"), [
    pytest.param(REJECT, "example.com", _spf("pass", "mail.example.com"), [],
                 DmarcResult("pass", "example.com", REJECT, "reject", "aligned SPF"),
                 id="relaxed-spf"),
    pytest.param(DmarcRecord("reject", "reject", aspf="s"), "example.com",
                 _spf("pass", "mail.example.com"), [],
                 DmarcResult("fail", "example.com", DmarcRecord("reject", "reject", aspf="s"),
                             "reject", "no aligned SPF or DKIM pass"), id="strict-spf"),
    pytest.param(REJECT, "example.com", _spf("fail", "example.com"), [GOOD],
                 DmarcResult("pass", "example.com", REJECT, "reject",
                             "aligned DKIM d=example.com"), id="dkim-only"),
    pytest.param(REJECT, "example.com", _spf("pass", "example.net"),
                 [DkimResult("pass", "example.net", "s", "b")],
                 DmarcResult("fail", "example.com", REJECT, "reject",
                             "no aligned SPF or DKIM pass"), id="neither-aligned"),
    pytest.param(REJECT, "example.com", _spf("temperror", "example.com"), [],
                 DmarcResult("temperror", "example.com", REJECT, "reject",
                             "an aligned identifier could not be checked"),
                 id="aligned-spf-unknown"),
    pytest.param(REJECT, "example.com", _spf("none", "example.net"),
                 [DkimResult("neutral", "example.com", "s", "b", "too big", checked=False)],
                 DmarcResult("temperror", "example.com", REJECT, "reject",
                             "an aligned identifier could not be checked"),
                 id="aligned-dkim-unchecked"),
    pytest.param(None, "example.com", SPF_PASS, [GOOD],
                 DmarcResult("none", "example.com", reason="no DMARC record"), id="no-record"),
])
def test_evaluate_dmarc(record: DmarcRecord | None, record_domain: str, spf: SpfResult,
                        dkims: list[DkimResult], expected: DmarcResult) -> None:
    assert evaluate_dmarc("example.com", record, record_domain, spf, dkims) == expected


def test_subdomain_policy_applies_when_the_record_is_the_organizations() -> None:
    record = DmarcRecord("none", "quarantine")
    spf = _spf("fail", "example.net")
    assert evaluate_dmarc("news.example.com", record, "example.com", spf, []).policy == (
        "quarantine")
    assert evaluate_dmarc("example.com", record, "example.com", spf, []).policy == "none"


@pytest.mark.parametrize(("values", "expected"), [
    pytest.param(["Alice <alice@Example.COM>"], ("example.com", ""), id="display-name"),
    pytest.param(["a@example.com, b@example.com"], ("example.com", ""), id="same-domain-twice"),
    pytest.param(["a@example.com", "b@example.net"], (None, "more than one author domain"),
                 id="two-domains"),
    pytest.param([], (None, "no author domain"), id="no-from"),
    pytest.param(["undisclosed"], (None, "no author domain"), id="no-address"),
    pytest.param(["a@exa_mple!.com"], (None, "author domain is not a valid name"), id="bad-char"),
    pytest.param(["a@localhost"], (None, "author domain is not a valid name"), id="one-label"),
])
def test_author_domain(values: list[str], expected: tuple[str | None, str]) -> None:
    assert author_domain(values) == expected


# --------------------------------------------------------------------------- header values


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("plain text", "plain text", id="plain"),
    pytest.param("a\r\nX-Evil: 1", "a X-Evil: 1", id="crlf"),
    pytest.param("a\nb\rc\x00d\x7fe", "a b c d e", id="controls"),
    pytest.param("a\u2028b\x85c", "a b c", id="unicode-line-breaks"),
    pytest.param("caf\udce9", "caf?", id="lone-surrogate"),
    pytest.param("x" * 300, "x" * 197 + "...", id="bounded"),
])
def test_sanitize(text: str, expected: str) -> None:
    assert sanitize(text) == expected


def test_comment_escapes_parentheses() -> None:
    assert comment("a (b) c\\") == r"(a \(b\) c\\)"


@pytest.mark.parametrize(("value", "spf", "ar", "address"), [
    pytest.param("mail.example.com", "mail.example.com", "mail.example.com",
                 "mail.example.com", id="domain"),
    pytest.param("a@example.com", '"a@example.com"', '"a@example.com"', "a@example.com",
                 id="address"),
    pytest.param("", '""', '""', '""', id="empty"),
    pytest.param('a "b"@x', r'"a \"b\"@x"', r'"a \"b\"@x"', r'"a \"b\"@x"', id="quotes"),
    pytest.param("a\r\n@x", '"a @x"', '"a @x"', '"a @x"', id="crlf-quoted"),
    pytest.param("Ab/C+d=", "Ab/C+d=", '"Ab/C+d="', '"Ab/C+d="', id="base64-is-a-dot-atom"),
])
def test_value_quoting(value: str, spf: str, ar: str, address: str) -> None:
    assert (spf_value(value), ar_value(value), ar_address(value)) == (spf, ar, address)


@pytest.mark.parametrize(("spf", "expected"), [
    pytest.param(
        SpfResult("pass", "mailfrom", "alice@example.com", "example.com"),
        "pass (mx.example.net: domain of example.com designates 192.0.2.1 as permitted "
        'sender) client-ip=192.0.2.1; envelope-from="alice@example.com"; helo=mail.example.com;',
        id="pass"),
    pytest.param(
        SpfResult("softfail", "mailfrom", "alice@example.com", "example.com"),
        "softfail (mx.example.net: transitioning domain of example.com does not designate "
        '192.0.2.1 as permitted sender) client-ip=192.0.2.1; envelope-from="alice@example.com"; '
        "helo=mail.example.com;", id="softfail"),
    pytest.param(
        SpfResult("permerror", "mailfrom", "alice@example.com", "example.com",
                  "Unknown mechanism found: moo(x)"),
        "permerror (mx.example.net: permanent error in processing domain of example.com: "
        r"Unknown mechanism found: moo\(x\)) client-ip=192.0.2.1; "
        'envelope-from="alice@example.com"; helo=mail.example.com;', id="permerror"),
])
def test_received_spf(spf: SpfResult, expected: str) -> None:
    value = received_spf(spf, client_ip="192.0.2.1", helo="mail.example.com",
                         mail_from="alice@example.com", authserv_id=AID)
    assert value == expected


def test_received_spf_null_sender_checks_helo() -> None:
    spf = SpfResult("none", "helo", "postmaster@mail.example.com", "mail.example.com")
    assert received_spf(spf, client_ip="2001:db8::1", helo="mail.example.com", mail_from="",
                        authserv_id=AID) == (
        "none (mx.example.net: domain of mail.example.com does not designate permitted sender "
        'hosts) client-ip="2001:db8::1"; envelope-from=""; helo=mail.example.com; '
        "identity=helo;")


def test_received_spf_without_a_client_address() -> None:
    spf = SpfResult("none", "mailfrom", "alice@example.com", "example.com",
                    "no client IP address")
    assert received_spf(spf, client_ip="", helo="localhost", mail_from="alice@example.com",
                        authserv_id=AID) == (
        'none (mx.example.net: no client IP address) client-ip=""; '
        'envelope-from="alice@example.com"; helo=localhost;')


def test_received_spf_hostile_input_stays_one_line() -> None:
    spf = SpfResult("none", "mailfrom", "a@x\r\nX-Evil: 1", "x\r\nX-Evil: 1")
    value = received_spf(spf, client_ip="192.0.2.1", helo="h\r\nX-Evil: 2",
                         mail_from="a@x\r\nX-Evil: 1", authserv_id=AID)
    assert "\r" not in value and "\n" not in value
    assert 'helo="h X-Evil: 2";' in value


def test_authentication_results_one_dkim_per_signature() -> None:
    dmarc = DmarcResult("pass", "example.com", REJECT, "reject", "aligned SPF")
    assert authentication_results(AID, SPF_PASS, [GOOD, BAD], dmarc) == (
        "mx.example.net; spf=pass smtp.mailfrom=alice@example.com; "
        'dkim=pass header.d=example.com header.s=sel1 header.b="AbCd/Ef+"; '
        "dkim=fail (body hash mismatch) header.d=example.com header.s=sel2 header.b=ZyXwVuTs; "
        "dmarc=pass (p=reject sp=reject) header.from=example.com")


def test_authentication_results_without_signature_or_record() -> None:
    dmarc = DmarcResult("none", "example.com", reason="no DMARC record")
    assert authentication_results(AID, SPF_PASS, [], dmarc) == (
        "mx.example.net; spf=pass smtp.mailfrom=alice@example.com; dkim=none; "
        "dmarc=none header.from=example.com")


def test_authentication_results_errors_and_helo_identity() -> None:
    spf = SpfResult("temperror", "helo", "postmaster@mail.example.com", "mail.example.com",
                    "DNS timeout looking up mail.example.com TXT")
    dkim = DkimResult("temperror", "example.com", "sel1", "", "DNS timeout")
    dmarc = DmarcResult("permerror", reason="more than one author domain")
    assert authentication_results(AID, spf, [dkim], dmarc) == (
        "mx.example.net; spf=temperror (DNS timeout looking up mail.example.com TXT) "
        "smtp.helo=mail.example.com; dkim=temperror (DNS timeout) header.d=example.com "
        "header.s=sel1; dmarc=permerror (more than one author domain)")


def test_authentication_results_hostile_values_are_quoted() -> None:
    spf = SpfResult("fail", "mailfrom", "a b@example.com", "example.com")
    dkim = DkimResult("fail", "evil;com", "s=1", "x", "reason\r\nX-Evil: 1")
    dmarc = DmarcResult("none", "example.com")
    value = authentication_results("mx example", spf, [dkim], dmarc)
    assert "\r" not in value and "\n" not in value
    assert value == (
        '"mx example"; spf=fail smtp.mailfrom="a b@example.com"; '
        'dkim=fail (reason X-Evil: 1) header.d="evil;com" header.s="s=1" header.b=x; '
        "dmarc=none header.from=example.com")
