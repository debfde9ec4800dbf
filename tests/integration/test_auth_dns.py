"""SPF, DKIM and DMARC against a real DNS server on loopback (harness.dns).

Messages are signed here with dkimpy and RSA keys made for the run; the public keys,
SPF and DMARC records are served by the test server, which every lookup must reach
(`DnsSettings` names it as ip:port; nothing else knows these records).
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.dns import DnsServer
from mxrules.scan import Verdict
from mxrules.scan.auth import (
    DNS_CACHE_ANSWER_BYTES,
    AuthResult,
    DnsSettings,
    check,
    forget_dns_answers,
)

AID = "mx.example.net"
CLIENT = "192.0.2.1"
HELO = "mail.example.com"
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


@dataclass(frozen=True)
class Key:
    pem: bytes  # private key, for dkim.sign
    record: str  # the selector's TXT record


def _make_key() -> Key:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    # A 2048-bit key is longer than one TXT string: the server splits it, DNS rejoins it.
    return Key(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())


@pytest.fixture(scope="module")
def keys() -> tuple[Key, Key]:
    return _make_key(), _make_key()


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def zone(dns_server: DnsServer) -> DnsServer:
    dns_server.load({})
    forget_dns_answers()  # answers are cached across checks; each test has its own zone
    return dns_server


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Happy paths log nothing at WARNING or above."""
    caplog.set_level(logging.DEBUG)
    yield
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def message(from_: str = "Alice <alice@example.com>", body: str = "Hello, world.\r\n") -> bytes:
    return (f"From: {from_}\r\nTo: bob@example.net\r\nSubject: test\r\n"
            "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n"
            f"\r\n{body}").encode()


def sign(msg: bytes, selector: str, domain: str, key: Key) -> bytes:
    header: bytes = dkim.sign(msg, selector.encode(), domain.encode(), key.pem,
                              include_headers=SIGNED_HEADERS)
    return header + msg


def b8(signed: bytes, index: int = 0) -> str:
    """header.b as RFC 6008 has it: b='s first 8 characters, quoted when not a token."""
    values = re.findall(rb"^DKIM-Signature:(.*?)(?=^\S)", signed, re.M | re.S)
    b = re.search(rb"\bb=([^;]*)", values[index]).group(1)  # type: ignore[union-attr]
    first = re.sub(rb"\s+", b"", b).decode()[:8]
    return f'"{first}"' if re.search(r"[/=]", first) else first


def run(zone: DnsServer, tmp_path: Path, msg: bytes, *, mail_from: str = "alice@example.com",
        helo: str = HELO, timeout: float = 10.0, dns_timeout: float = 3.0,
        max_size: int = 1_000_000) -> AuthResult:
    path = tmp_path / "message"
    path.write_bytes(msg)
    return check(str(path), client_ip=CLIENT, helo=helo, mail_from=mail_from, authserv_id=AID,
                 dns=DnsSettings(nameservers=(zone.address,), timeout=dns_timeout),
                 timeout=timeout, max_size=max_size)


SPF_PASS = {"example.com": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]}}


def received_spf(result: str, explanation: str, mail_from: str = "alice@example.com") -> str:
    return (f"{result} ({AID}: {explanation}) client-ip={CLIENT}; envelope-from=\"{mail_from}\"; "
            f"helo={HELO};")


# --------------------------------------------------------------------------- the server


def test_server_answers_udp_and_tcp(zone: DnsServer) -> None:
    zone.set("example.com", "TXT", ["x" * 600])
    query = dns.message.make_query("example.com", "TXT")
    for send in (dns.query.udp, dns.query.tcp):
        answer = send(query, "127.0.0.1", port=zone.port, timeout=5)
        assert b"".join(answer.answer[0][0].strings) == b"x" * 600
    assert [q.protocol for q in zone.queries] == ["udp", "tcp"]


# --------------------------------------------------------------------------- DKIM


def test_signed_message_passes_and_every_lookup_reaches_the_server(
        zone: DnsServer, keys: tuple[Key, Key], tmp_path: Path, quiet: None) -> None:
    zone.load({**SPF_PASS,
               "sel1._domainkey.example.com": {"TXT": [keys[0].record]},
               "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]}})
    signed = sign(message(), "sel1", "example.com", keys[0])
    result = run(zone, tmp_path, signed)
    assert (result.spf, result.dkim, result.dmarc, result.dmarc_policy) == (
        Verdict("PASS", "pass"), Verdict("PASS", "pass d=example.com s=sel1"),
        Verdict("PASS", "pass (aligned SPF)"), None)
    assert result.authentication_results == (
        f"{AID}; spf=pass smtp.mailfrom=alice@example.com; "
        f"dkim=pass header.d=example.com header.s=sel1 header.b={b8(signed)}; "
        "dmarc=pass (p=reject sp=reject) header.from=example.com")
    assert result.received_spf == received_spf(
        "pass", "domain of example.com designates 192.0.2.1 as permitted sender")
    assert zone.asked("TXT") == ["example.com", "sel1._domainkey.example.com",
                                 "_dmarc.example.com"]


def test_modified_body_fails(zone: DnsServer, keys: tuple[Key, Key], tmp_path: Path) -> None:
    zone.load({**SPF_PASS, "sel1._domainkey.example.com": {"TXT": [keys[0].record]},
               "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]}})
    signed = sign(message(), "sel1", "example.com", keys[0])
    result = run(zone, tmp_path, signed.replace(b"Hello, world.", b"Hello, w0rld."))
    assert result.dkim == Verdict("FAIL", "fail d=example.com s=sel1 (body hash mismatch)")
    # DMARC still passes: SPF is aligned.
    assert (result.spf.status, result.dmarc.status) == ("PASS", "PASS")
    assert result.authentication_results == (
        f"{AID}; spf=pass smtp.mailfrom=alice@example.com; "
        f"dkim=fail (body hash mismatch) header.d=example.com header.s=sel1 "
        f"header.b={b8(signed)}; dmarc=pass (p=reject sp=reject) header.from=example.com")


def test_two_signatures_one_good_one_bad(zone: DnsServer, keys: tuple[Key, Key],
                                         tmp_path: Path) -> None:
    # sel2 publishes key 0 but signed with key 1: that signature cannot verify.
    zone.load({"sel1._domainkey.example.com": {"TXT": [keys[0].record]},
               "sel2._domainkey.example.com": {"TXT": [keys[0].record]},
               "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]}})
    signed = sign(sign(message(), "sel1", "example.com", keys[0]), "sel2", "example.com", keys[1])
    result = run(zone, tmp_path, signed)
    assert result.dkim == Verdict(
        "FAIL", "fail d=example.com s=sel2 (signature did not verify); pass d=example.com s=sel1")
    # No SPF record, but the good signature is aligned.
    assert (result.spf.status, result.dmarc.status) == ("GRAY", "PASS")
    assert result.authentication_results == (
        f"{AID}; spf=none smtp.mailfrom=alice@example.com; "
        f"dkim=fail (signature did not verify) header.d=example.com header.s=sel2 "
        f"header.b={b8(signed, 0)}; "
        f"dkim=pass header.d=example.com header.s=sel1 header.b={b8(signed, 1)}; "
        "dmarc=pass (p=reject sp=reject) header.from=example.com")


# The body is hashed from the file as a stream and dkimpy sees only the header block:
# each case must come out exactly as dkimpy's verify over the whole message.
TRICKY = "Hello,  world. \t\r\n\r\n  indented\ttabs\t\r\nbare\nlf\r\nbare\rcr\r\n\r\n\r\n"


def _append(extra: bytes) -> Any:
    return lambda signed: signed + extra


def _replace(old: bytes, new: bytes) -> Any:
    return lambda signed: signed.replace(old, new, 1)


@pytest.mark.parametrize(("canon", "algorithm", "length", "body", "change"), [
    pytest.param((b"simple", b"simple"), b"rsa-sha256", False, TRICKY, None, id="simple"),
    pytest.param((b"relaxed", b"relaxed"), b"rsa-sha256", False, TRICKY, None, id="relaxed"),
    pytest.param((b"relaxed", b"simple"), b"rsa-sha1", False, TRICKY, None, id="sha1"),
    pytest.param((b"simple", b"relaxed"), b"rsa-sha256", False, "", None, id="empty-body"),
    pytest.param((b"relaxed", b"simple"), b"rsa-sha256", False, "x\r\n" * 300_000, None,
                 id="large-body"),
    pytest.param((b"relaxed", b"relaxed"), b"rsa-sha256", True, TRICKY,
                 _append(b"appended below l=\r\n"), id="l-tag-with-appended-text"),
    pytest.param((b"relaxed", b"relaxed"), b"rsa-sha256", False, TRICKY,
                 _replace(b"Hello,  world.", b"Hello, world.  "), id="relaxed-whitespace"),
    pytest.param((b"relaxed", b"simple"), b"rsa-sha256", False, TRICKY,
                 _replace(b"Hello,  world.", b"Hello, world.  "), id="simple-whitespace"),
    pytest.param((b"relaxed", b"relaxed"), b"rsa-sha256", False, TRICKY,
                 _append(b"\r\n\r\n \r\n"), id="relaxed-trailing-lines"),
    pytest.param((b"relaxed", b"simple"), b"rsa-sha256", False, TRICKY,
                 _append(b"P.S.\r\n"), id="body-changed"),
    pytest.param((b"relaxed", b"simple"), b"rsa-sha256", False, TRICKY,
                 _replace(b"Subject: test", b"Subject: tEst"), id="header-changed"),
    pytest.param((b"simple", b"simple"), b"rsa-sha256", False, "x\r\n",
                 _replace(b"\r\n", b"\n"), id="lf-line-ends"),
])
def test_streamed_body_hash_verifies_as_dkimpy_does(
        zone: DnsServer, keys: tuple[Key, Key], tmp_path: Path, canon: tuple[bytes, bytes],
        algorithm: bytes, length: bool, body: str, change: Any) -> None:
    zone.load({"sel1._domainkey.example.com": {"TXT": [keys[0].record]}})
    msg = message(body=body)
    signed = dkim.DKIM(msg).sign(b"sel1", b"example.com", keys[0].pem, canonicalize=canon,
                                 signature_algorithm=algorithm, length=length,
                                 include_headers=SIGNED_HEADERS) + msg
    if change is not None:
        signed = change(signed)
    result = run(zone, tmp_path, signed, max_size=len(signed))
    [got] = re.findall(r"dkim=(\w+)(?: \(([^)]*)\))?", result.authentication_results)
    assert got == _dkimpy_verdict(signed, keys[0])


def _dkimpy_verdict(signed: bytes, key: Key) -> tuple[str, str]:
    """dkimpy's verify over the whole message in memory, as mxrules words the outcome."""
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return key.record.encode()

    try:
        ok = dkim.DKIM(signed).verify(dnsfunc=dnsfunc)
    except dkim.ValidationError as exc:
        return "fail", str(exc).split(" (")[0]
    return ("pass", "") if ok else ("fail", "signature did not verify")


def test_unsigned_message_is_gray(zone: DnsServer, tmp_path: Path, quiet: None) -> None:
    zone.load(SPF_PASS)
    result = run(zone, tmp_path, message())
    assert (result.dkim, result.dmarc, result.dmarc_policy) == (
        Verdict("GRAY", "no signature"), Verdict("GRAY", "none (no DMARC record)"), None)
    assert result.authentication_results == (
        f"{AID}; spf=pass smtp.mailfrom=alice@example.com; dkim=none; "
        "dmarc=none header.from=example.com")


def test_missing_key_is_a_failure(zone: DnsServer, keys: tuple[Key, Key],
                                  tmp_path: Path) -> None:
    zone.load(SPF_PASS)
    signed = sign(message(), "gone", "example.com", keys[0])
    result = run(zone, tmp_path, signed)
    assert result.dkim == Verdict("FAIL", "permerror d=example.com s=gone (no key for signature)")
    assert result.authentication_results == (
        f"{AID}; spf=pass smtp.mailfrom=alice@example.com; "
        f"dkim=permerror (no key for signature) header.d=example.com header.s=gone "
        f"header.b={b8(signed)}; dmarc=none header.from=example.com")


def test_unsigned_message_over_the_size_limit_is_gray(zone: DnsServer, tmp_path: Path) -> None:
    # Unsigned: nothing for DKIM to verify, so the size limit does not matter (only the
    # header block is read; DMARC needs From, and finds it there).
    zone.load({**SPF_PASS, "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]}})
    msg = message(body="x" * 5000 + "\r\n")
    result = run(zone, tmp_path, msg, max_size=len(msg) // 2)
    assert (result.spf.status, result.dkim, result.dmarc.status) == (
        "PASS", Verdict("GRAY", "no signature"), "PASS")
    assert "; dkim=none; dmarc=pass " in result.authentication_results


def test_key_lookup_servfail_is_processing_failed(zone: DnsServer, keys: tuple[Key, Key],
                                                  tmp_path: Path) -> None:
    zone.load(SPF_PASS)
    zone.servfail.add("sel1._domainkey.example.com")
    signed = sign(message(), "sel1", "example.com", keys[0])
    result = run(zone, tmp_path, signed)
    why = "no DNS server answered sel1._domainkey.example.com TXT"
    assert result.dkim == Verdict("PROCESSING_FAILED", f"temperror d=example.com s=sel1 ({why})")
    assert result.authentication_results == (
        f"{AID}; spf=pass smtp.mailfrom=alice@example.com; "
        f"dkim=temperror ({why}) header.d=example.com header.s=sel1 header.b={b8(signed)}; "
        "dmarc=none header.from=example.com")


def test_signatures_past_ten_are_not_checked(zone: DnsServer, keys: tuple[Key, Key],
                                            tmp_path: Path) -> None:
    # A selector per signature: each checked one costs its own lookup (answers are cached).
    zone.load({f"sel{i}._domainkey.example.com": {"TXT": [keys[0].record]} for i in range(12)})
    signed = message()
    for i in range(12):
        signed = sign(signed, f"sel{i}", "example.com", keys[0])
    result = run(zone, tmp_path, signed)
    # Checked ones pass; two were not looked at, so no PASS either.
    assert result.dkim.status == "PROCESSING_FAILED"
    assert result.authentication_results.count("dkim=pass ") == 10
    assert "; dkim=neutral (2 more signatures not checked); dmarc=none" in (
        result.authentication_results)
    keys_asked = [n for n in zone.asked("TXT") if "._domainkey." in n]
    # The last signature added is the first in the header block, and checked first.
    assert keys_asked == [f"sel{i}._domainkey.example.com" for i in range(11, 1, -1)]


def test_answers_are_shared_across_messages(zone: DnsServer, keys: tuple[Key, Key],
                                            tmp_path: Path) -> None:
    zone.load({**SPF_PASS, "sel1._domainkey.example.com": {"TXT": [keys[0].record]},
               "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]}})
    signed = sign(message(), "sel1", "example.com", keys[0])
    first = run(zone, tmp_path, signed)
    asked = zone.asked()
    again = run(zone, tmp_path, signed)
    assert (again.spf, again.dkim, again.dmarc) == (first.spf, first.dkim, first.dmarc)
    assert (first.spf.status, first.dkim.status, first.dmarc.status) == ("PASS",) * 3
    assert zone.asked() == asked  # the second message asked DNS nothing


def test_negative_answers_without_soa_are_not_kept(zone: DnsServer, tmp_path: Path) -> None:
    # This server's NXDOMAIN carries no SOA, so no negative TTL (RFC 2308 §5: not cached).
    zone.load({})
    for _ in range(2):
        assert run(zone, tmp_path, message()).spf.status == "GRAY"
    assert zone.asked("TXT") == ["example.com", "_dmarc.example.com"] * 2


def test_large_answers_are_used_but_not_kept(zone: DnsServer, tmp_path: Path) -> None:
    # Valid SPF padded past the cache's per-answer bound (TCP fallback brings it whole).
    padding = ["v=spf1 ip4:192.0.2.1 -all"] + [f"x{i}-" + "y" * 250
                                               for i in range(DNS_CACHE_ANSWER_BYTES // 250 + 2)]
    zone.load({"example.com": {"TXT": padding}})
    for _ in range(2):
        assert run(zone, tmp_path, message()).spf.status == "PASS"
    assert zone.asked("TXT").count("example.com") == 2


def test_message_over_the_size_limit(zone: DnsServer, keys: tuple[Key, Key],
                                     tmp_path: Path) -> None:
    zone.load({**SPF_PASS, "sel1._domainkey.example.com": {"TXT": [keys[0].record]},
               "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]}})
    signed = sign(message(), "sel1", "example.com", keys[0])
    result = run(zone, tmp_path, signed, max_size=len(signed) - 1)
    assert result.dkim == Verdict("PROCESSING_FAILED", "over the size limit")
    assert (result.spf.status, result.dmarc.status) == ("PASS", "PASS")
    assert result.authentication_results == (
        f"{AID}; spf=pass smtp.mailfrom=alice@example.com; "
        f"dkim=neutral (message over the size limit) header.d=example.com header.s=sel1 "
        f"header.b={b8(signed)}; dmarc=pass (p=reject sp=reject) header.from=example.com")
    assert "sel1._domainkey.example.com" not in zone.asked()


def test_unreadable_message_keeps_spf(zone: DnsServer, tmp_path: Path) -> None:
    zone.load(SPF_PASS)
    result = check(str(tmp_path / "missing"), client_ip=CLIENT, helo=HELO,
                   mail_from="alice@example.com", authserv_id=AID,
                   dns=DnsSettings(nameservers=(zone.address,)), timeout=10, max_size=1000)
    assert result.spf.status == "PASS"
    assert (result.dkim.status, result.dmarc.status) == ("PROCESSING_FAILED",
                                                         "PROCESSING_FAILED")
    assert result.authentication_results == (
        f"{AID}; spf=pass smtp.mailfrom=alice@example.com; "
        "dkim=neutral (message not readable: No such file or directory); "
        "dmarc=temperror (message not readable: No such file or directory)")


# --------------------------------------------------------------------------- SPF


@pytest.mark.parametrize(("records", "status", "received"), [
    pytest.param({"example.com": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}}, "PASS",
                 received_spf("pass", "domain of example.com designates 192.0.2.1 as "
                              "permitted sender"), id="pass-ip4"),
    pytest.param({"example.com": {"TXT": ["v=spf1 mx -all"], "MX": ["10 mail.example.com"]},
                  "mail.example.com": {"A": ["192.0.2.1"]}}, "PASS",
                 received_spf("pass", "domain of example.com designates 192.0.2.1 as "
                              "permitted sender"), id="pass-mx"),
    pytest.param({"example.com": {"TXT": ["v=spf1 ip4:198.51.100.1 -all"]}}, "FAIL",
                 received_spf("fail", "domain of example.com does not designate 192.0.2.1 "
                              "as permitted sender"), id="fail"),
    pytest.param({"example.com": {"TXT": ["v=spf1 ip4:198.51.100.1 ~all"]}}, "GRAY",
                 received_spf("softfail", "transitioning domain of example.com does not "
                              "designate 192.0.2.1 as permitted sender"), id="softfail"),
    pytest.param({"example.com": {"TXT": ["v=spf1 ?all"]}}, "GRAY",
                 received_spf("neutral", "192.0.2.1 is neither permitted nor denied by domain "
                              "of example.com"), id="neutral"),
    pytest.param({"example.com": {"TXT": ["some other record"]}}, "GRAY",
                 received_spf("none", "domain of example.com does not designate permitted "
                              "sender hosts"), id="none"),
    pytest.param({"example.com": {"TXT": ["v=spf1 moo -all"]}}, "PROCESSING_FAILED",
                 received_spf("permerror", "permanent error in processing domain of "
                              "example.com: Unknown mechanism found"), id="permerror"),
])
def test_spf(zone: DnsServer, tmp_path: Path, records: dict[str, dict[str, list[str]]],
             status: str, received: str) -> None:
    zone.load(records)
    result = run(zone, tmp_path, message())
    assert result.spf.status == status
    assert result.received_spf == received
    code = received.split(" ", 1)[0]
    problem = " (Unknown mechanism found)" if code == "permerror" else ""
    assert result.authentication_results == (
        f"{AID}; spf={code}{problem} smtp.mailfrom=alice@example.com; dkim=none; "
        "dmarc=none header.from=example.com")


def test_null_sender_checks_helo(zone: DnsServer, tmp_path: Path) -> None:
    zone.load({HELO: {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]}})
    result = run(zone, tmp_path, message(), mail_from="")
    assert result.spf.status == "PASS"
    assert result.received_spf == (
        f"pass ({AID}: domain of {HELO} designates 192.0.2.1 as permitted sender) "
        f'client-ip={CLIENT}; envelope-from=""; helo={HELO}; identity=helo;')
    assert result.authentication_results.startswith(f"{AID}; spf=pass smtp.helo={HELO}; ")


def test_no_client_address_is_none(zone: DnsServer, tmp_path: Path, quiet: None) -> None:
    zone.load(SPF_PASS)
    path = tmp_path / "message"
    path.write_bytes(message())
    result = check(str(path), client_ip="", helo="localhost", mail_from="alice@example.com",
                   authserv_id=AID, dns=DnsSettings(nameservers=(zone.address,)), timeout=10,
                   max_size=100_000)
    assert result.spf == Verdict("GRAY", "none: no client IP address")
    assert result.authentication_results.startswith(
        f"{AID}; spf=none (no client IP address) smtp.mailfrom=alice@example.com; ")


def test_hostile_envelope_stays_on_one_line(zone: DnsServer, tmp_path: Path) -> None:
    zone.load(SPF_PASS)
    result = run(zone, tmp_path, message(), mail_from="a@example.com\r\nX-Evil: 1",
                 helo="h\r\nX-Evil: 2")
    for value in (result.received_spf, result.authentication_results):
        assert "\r" not in value and "\n" not in value
    assert 'helo="h X-Evil: 2";' in result.received_spf


# --------------------------------------------------------------------------- DMARC


def test_dmarc_aligned_spf_passes(zone: DnsServer, tmp_path: Path, quiet: None) -> None:
    # Relaxed alignment: the bounce domain is a subdomain of the From domain.
    zone.load({"bounce.example.com": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
               "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject; rua=mailto:d@example.com"]}})
    result = run(zone, tmp_path, message(), mail_from="b@bounce.example.com")
    assert (result.dmarc, result.dmarc_policy) == (Verdict("PASS", "pass (aligned SPF)"), None)
    assert result.authentication_results == (
        f"{AID}; spf=pass smtp.mailfrom=b@bounce.example.com; dkim=none; "
        "dmarc=pass (p=reject sp=reject) header.from=example.com")


def test_dmarc_neither_aligned_fails_with_reject(zone: DnsServer, keys: tuple[Key, Key],
                                                 tmp_path: Path) -> None:
    # SPF and DKIM both pass, for example.net; the From domain is example.com.
    zone.load({"example.net": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
               "sel1._domainkey.example.net": {"TXT": [keys[0].record]},
               "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]}})
    signed = sign(message(), "sel1", "example.net", keys[0])
    result = run(zone, tmp_path, signed, mail_from="b@example.net")
    assert (result.spf.status, result.dkim.status) == ("PASS", "PASS")
    assert (result.dmarc, result.dmarc_policy) == (
        Verdict("FAIL", "fail (no aligned SPF or DKIM pass)"), "reject")
    assert result.authentication_results == (
        f"{AID}; spf=pass smtp.mailfrom=b@example.net; "
        f"dkim=pass header.d=example.net header.s=sel1 header.b={b8(signed)}; "
        "dmarc=fail (p=reject sp=reject) header.from=example.com")


def test_dmarc_subdomain_policy_from_the_organizational_domain(zone: DnsServer,
                                                              tmp_path: Path) -> None:
    zone.load({"_dmarc.example.com": {"TXT": ["v=DMARC1; p=none; sp=quarantine"]}})
    result = run(zone, tmp_path, message(from_="news@news.example.com"))
    assert (result.dmarc.status, result.dmarc_policy) == ("FAIL", "quarantine")
    assert zone.asked("TXT")[-2:] == ["_dmarc.news.example.com", "_dmarc.example.com"]
    assert result.authentication_results.endswith(
        "dmarc=fail (p=none sp=quarantine) header.from=news.example.com")


def test_dmarc_failure_under_p_none_is_gray(zone: DnsServer, tmp_path: Path) -> None:
    zone.load({"_dmarc.example.com": {"TXT": ["v=DMARC1; p=none"]}})
    result = run(zone, tmp_path, message())
    assert (result.dmarc, result.dmarc_policy) == (
        Verdict("GRAY", "fail (no aligned SPF or DKIM pass)"), "none")
    assert result.authentication_results.endswith(
        "dmarc=fail (p=none sp=none) header.from=example.com")


def test_no_dmarc_record_is_gray(zone: DnsServer, tmp_path: Path) -> None:
    zone.load(SPF_PASS)
    result = run(zone, tmp_path, message(from_="a@mail.example.com"))
    assert (result.dmarc, result.dmarc_policy) == (Verdict("GRAY", "none (no DMARC record)"),
                                                   None)
    assert zone.asked("TXT")[-2:] == ["_dmarc.mail.example.com", "_dmarc.example.com"]
    assert result.authentication_results.endswith("dmarc=none header.from=mail.example.com")


# --------------------------------------------------------------------------- deadline


def test_black_holed_server_is_processing_failed_within_the_timeout(
        zone: DnsServer, keys: tuple[Key, Key], tmp_path: Path) -> None:
    zone.load({**SPF_PASS, "sel1._domainkey.example.com": {"TXT": [keys[0].record]},
               "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]}})
    zone.blackhole = True
    signed = sign(message(), "sel1", "example.com", keys[0])
    timeout, margin = 2.0, 1.5  # a correctness check of the deadline, not a speed test
    started = time.monotonic()
    result = run(zone, tmp_path, signed, timeout=timeout, dns_timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < timeout + margin
    assert (result.spf.status, result.dkim.status, result.dmarc.status) == (
        "PROCESSING_FAILED", "PROCESSING_FAILED", "PROCESSING_FAILED")
    assert result.dmarc_policy is None
    assert zone.queries, "the queries reached the black hole"
    assert re.fullmatch(
        rf"{re.escape(AID)}; spf=temperror \([^)]+\) smtp\.mailfrom=alice@example\.com; "
        rf"dkim=temperror \([^)]+\) header\.d=example\.com header\.s=sel1 "
        rf"header\.b={re.escape(b8(signed))}; "
        r"dmarc=temperror \([^)]+\) header\.from=example\.com",
        result.authentication_results), result.authentication_results
    assert result.received_spf.startswith(
        f"temperror ({AID}: temporary error in processing during lookup of example.com: ")
