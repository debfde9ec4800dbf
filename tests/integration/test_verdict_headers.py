"""Verdicts a consumer can trust, end to end: Postfix -> milter -> worker -> moto.

A rule without scan_enabled stores to S3 and publishes to SNS (read back through
an SQS subscription); Postfix also delivers its own copy (`delivery: deliver`)
to a sink.  SPF, DKIM and DMARC run on every message (SES authenticates every
message; scan_enabled switches only spam and virus), against the local DNS
server, so the verdicts and headers here are real ones.

- Forged verdicts never reach a consumer: an Authentication-Results naming this
  host as authserv-id -- however RFC 8601 lets it be written (a comment before
  it, a quoted-string, another case) -- and any X-SES-*-Verdict are gone from
  Postfix's copy, the S3 object and the notification; someone else's
  Authentication-Results and an incoming Received-SPF stay, below ours.
- The notification carries the real spf/dkim/dmarc verdicts (spam and virus
  DISABLED), and the stored copy their Received-SPF and Authentication-Results.
"""

from __future__ import annotations

import base64
import email
import json
from collections.abc import Iterator
from email import policy
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from integration.test_actions import Loop, make_loop  # noqa: F401 (make_loop: a fixture)

from harness.dns import DnsServer
from harness.smtp import send

pytestmark = pytest.mark.postfix

CLIENT = "192.0.2.7"  # allowed by the harness's IP filters
SENDER = "alice@sender.test"


def _key() -> tuple[bytes, str]:
    """A private key for dkim.sign and its selector record."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


KEY_PEM, KEY_RECORD = _key()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer({
        "sender.test": {"TXT": [f"v=spf1 ip4:{CLIENT} -all"]},
        "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
        "sel1._domainkey.sender.test": {"TXT": [KEY_RECORD]},
        "bank.test": {"TXT": ["v=spf1 ip4:198.51.100.1 -all"]},
        "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
    })
    server.start()
    yield server
    server.stop()


def unscanned(res: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": "unscanned", "enabled": True, "recipients": ["user@example.com"],
             "actions": [{"s3": {"bucket_name": res["bucket"], "object_key_prefix": "mail/"}},
                         {"sns": {"topic_arn": res["topic"], "encoding": "UTF-8"}}]}]


def loop_with(make_loop: Any, dns: DnsServer) -> Loop:  # noqa: F811 (the fixture's value)
    loop: Loop = make_loop(rules=unscanned, delivery="deliver",
                           scan={"dns": {"nameservers": [dns.address], "timeout": 2}})
    return loop


def deliver(loop: Loop, msg: bytes, sender: str = SENDER) -> None:
    r = send("127.0.0.1", loop.postfix.smtp_port, sender, ["user@example.com"], msg,
             client_ip=CLIENT)
    assert r.data is not None and r.data[0] == 250, r


def message(subject: str, from_: str = SENDER, extra: str = "") -> bytes:
    return (f"From: <{from_}>\r\nTo: <user@example.com>\r\nSubject: {subject}\r\n"
            f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@sender.test>\r\n{extra}"
            "\r\nHello.\r\n").encode()


def headers(raw: bytes) -> list[tuple[str, str]]:
    parsed = email.message_from_bytes(raw, policy=policy.compat32)
    return [(name, " ".join(str(value).split())) for name, value in parsed.items()]


def copies(loop: Loop, nth: int = 1) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Any]]:
    """The `nth` message's copies a consumer reads -- the S3 object, the notification's,
    Postfix's delivered one -- by their headers, and the notification."""
    counts = loop.wait_idle()
    assert counts["failed"] == 0, loop.worker.log()[-3000:]
    [envelope] = loop.moto.sns_messages(loop.queue, 1)
    note = json.loads(envelope["Message"])
    stored, _ = loop.moto.s3_object(loop.bucket, "mail/" + note["mail"]["messageId"])
    assert note["content"].encode() == stored  # UTF-8 content: the stored copy itself
    loop.sink.wait_for(nth)
    return {"s3": headers(stored),
            "notification": [(h["name"], " ".join(h["value"].split()))
                             for h in note["mail"]["headers"]],
            "postfix": headers(loop.sink.messages[nth - 1].data)}, note


def verdicts(note: dict[str, Any]) -> dict[str, str]:
    receipt = note["receipt"]
    out = {k: v["status"] for k, v in receipt.items() if k.endswith("Verdict")}
    if "dmarcPolicy" in receipt:
        out["dmarcPolicy"] = receipt["dmarcPolicy"]
    return out


def header_b(signed: bytes) -> str:
    """header.b as RFC 6008 has it: the signature's first 8 characters, quoted if not a token."""
    sig = email.message_from_bytes(signed, policy=policy.compat32)["DKIM-Signature"]
    b = "".join(sig.split("b=")[-1].split())[:8]
    return f'"{b}"' if any(c in b for c in "/=") else b


# Each header that must go carries ATTACKER; the two that stay do not.
FORGED = ("Authentication-Results: (x) mx.test; spf=pass smtp.mailfrom=ATTACKER@bank.test\r\n"
          'Authentication-Results: "mx.test"; dkim=pass header.d=bank.test header.s=ATTACKER\r\n'
          "Authentication-Results: (a (nested) comment)\r\n MX.Test; dmarc=pass ATTACKER\r\n"
          "Authentication-Results: other.example; spf=none\r\n"
          "X-SES-Spam-Verdict: PASS ATTACKER\r\nx-ses-virus-verdict: PASS ATTACKER\r\n"
          "X-SES-Spam-Verdict : PASS ATTACKER\r\n"
          "Received-SPF: pass (their.example: listed) client-ip=192.0.2.7;\r\n")


def test_forged_verdict_headers_never_reach_a_consumer(make_loop: Any,  # noqa: F811
                                                       dns: DnsServer) -> None:
    loop = loop_with(make_loop, dns)
    deliver(loop, message("verdicts", extra=FORGED))
    found, _ = copies(loop)
    for where, hs in found.items():
        assert "ATTACKER" not in repr(hs), (where, hs)
        results = [v for n, v in hs if n.lower() == "authentication-results"]
        assert len(results) == 2, (where, results)
        assert results[0].startswith("mx.test; spf=pass smtp.mailfrom=alice@sender.test;"), where
        assert results[1] == "other.example; spf=none", where  # not ours: kept
        assert [n for n, _ in hs if n.lower().startswith("x-ses-")] == [], where
        # An incoming Received-SPF stays, as SES keeps it, below ours.
        spf = [(i, v) for i, (n, v) in enumerate(hs) if n.lower() == "received-spf"]
        assert len(spf) == 2, (where, spf)
        assert spf[0][1].startswith("pass (mx.test: domain of sender.test designates"), where
        assert spf[1][1].startswith("pass (their.example:"), where
        their_ar = next(i for i, (_, v) in enumerate(hs) if v.startswith("other.example"))
        assert spf[0][0] < their_ar, where  # ours sits above every incoming header


def test_unscanned_rule_gets_real_authentication_verdicts(make_loop: Any,  # noqa: F811
                                                          dns: DnsServer) -> None:
    loop = loop_with(make_loop, dns)
    signed = message("signed")
    signed = dkim.sign(signed, b"sel1", b"sender.test", KEY_PEM,
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]
                       ) + signed
    deliver(loop, signed)
    found, note = copies(loop)
    assert verdicts(note) == {"spamVerdict": "DISABLED", "virusVerdict": "DISABLED",
                              "spfVerdict": "PASS", "dkimVerdict": "PASS",
                              "dmarcVerdict": "PASS"}
    for where, hs in found.items():
        named = dict(hs)
        assert named["Received-SPF"].startswith("pass (mx.test: domain of sender.test"), where
        assert named["Authentication-Results"] == (
            "mx.test; spf=pass smtp.mailfrom=alice@sender.test; dkim=pass header.d=sender.test "
            f"header.s=sel1 header.b={header_b(signed)}; dmarc=pass (p=reject sp=reject) "
            "header.from=sender.test"), where

    # Someone else's domain, from an address its SPF does not list: FAIL, with the policy.
    deliver(loop, message("spoofed", from_="ceo@bank.test"), sender="ceo@bank.test")
    found, note = copies(loop, 2)
    assert verdicts(note) == {"spamVerdict": "DISABLED", "virusVerdict": "DISABLED",
                              "spfVerdict": "FAIL", "dkimVerdict": "GRAY",
                              "dmarcVerdict": "FAIL", "dmarcPolicy": "reject"}
    for where, hs in found.items():
        named = dict(hs)
        assert named["Received-SPF"].startswith(
            "fail (mx.test: domain of bank.test does not designate 192.0.2.7"), where
        assert named["Authentication-Results"].startswith(
            "mx.test; spf=fail smtp.mailfrom=ceo@bank.test; dkim=none; dmarc=fail"), where
