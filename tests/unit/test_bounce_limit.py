"""When a Bounce may send its DSN: the sender's authentication and the rate limits.

The limiter's clock is injected (a list the test advances), so windows are
checked without waiting.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from harness.jobs import make_job
from mxrules.actions.bounce_limit import (
    BounceLimiter,
    authenticated_by,
    client_key,
    dmarc_from_domain,
)
from mxrules.scan.auth import (
    DkimResult,
    DmarcRecord,
    DmarcResult,
    SpfResult,
    authentication_results,
)
from mxrules.spool import Job

AR = "Authentication-Results"


def _job(mail_from: str = "alice@example.net", verdicts: dict[str, str] | None = None,
         auth: str = "") -> Job:
    return make_job(
        b"x", queue_id="Q1", mail_from=mail_from, recipients=("bob@example.com",),
        verdicts=verdicts or {}, auth_headers=((AR, auth),) if auth else ())


def _ar(dmarc: str) -> str:
    return ("mx.example.com; spf=fail smtp.mailfrom=alice@example.net; dkim=pass "
            f"header.d=example.net header.s=s1 header.b=abcdefgh; {dmarc}")


@pytest.mark.parametrize(
    ("mail_from", "verdicts", "auth", "expected"),
    [
        pytest.param("alice@example.net", {"spf": "PASS", "dmarc": "GRAY"}, "", "spf",
                     id="spf-pass"),
        pytest.param("alice@example.net", {"spf": "FAIL", "dmarc": "PASS"},
                     _ar("dmarc=pass (p=reject sp=reject) header.from=example.net"), "dmarc",
                     id="dmarc-pass-same-domain"),
        pytest.param("bounces@mail.example.net", {"spf": "GRAY", "dmarc": "PASS"},
                     _ar("dmarc=pass (p=none sp=none) header.from=example.net"), "dmarc",
                     id="dmarc-pass-relaxed-alignment"),
        pytest.param("victim@victim.example", {"spf": "FAIL", "dmarc": "PASS"},
                     _ar("dmarc=pass (p=reject sp=reject) header.from=attacker.example"), "",
                     id="dmarc-pass-for-another-domain-is-not-the-sender"),
        pytest.param("alice@example.net", {"spf": "FAIL", "dmarc": "PASS"}, "", "",
                     id="dmarc-pass-without-our-header"),
        pytest.param("alice@example.net", {"spf": "FAIL", "dmarc": "FAIL"},
                     _ar("dmarc=fail (p=reject sp=reject) header.from=example.net"), "",
                     id="both-fail"),
        pytest.param("alice@example.net", {"spf": "GRAY", "dmarc": "GRAY"}, "", "",
                     id="gray"),
        pytest.param("alice@example.net", {"spf": "PROCESSING_FAILED"}, "", "",
                     id="processing-failed"),
        pytest.param("alice@example.net", {"spf": "DISABLED", "dmarc": "DISABLED"}, "", "",
                     id="unscanned-rule-disabled"),
        pytest.param("alice@example.net", {}, "", "", id="no-verdicts"),
        pytest.param("alice@example.net", {"spf": "pass"}, "", "", id="status-is-exact"),
    ],
)
def test_authenticated_by(mail_from: str, verdicts: dict[str, str], auth: str,
                          expected: str) -> None:
    assert authenticated_by(_job(mail_from, verdicts, auth)) == expected


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        pytest.param(_ar("dmarc=pass (p=reject sp=reject) header.from=example.net"),
                     "example.net", id="token"),
        pytest.param(_ar("dmarc=pass header.from=example.net"), "example.net",
                     id="no-record-comment"),
        pytest.param(_ar('dmarc=pass header.from="ex ample.net"'), "", id="quoted-not-read"),
        pytest.param(_ar('dmarc=fail (p=reject sp=reject) header.from="x; dmarc=pass '
                         'header.from=victim.example"'), "", id="entry-inside-a-quote"),
        pytest.param(_ar("dmarc=pass (p=none sp=none) header.from=example.net") + "; x=y", "",
                     id="not-the-last-entry"),
        pytest.param(_ar("dmarc=fail (p=reject sp=reject) header.from=example.net"), "",
                     id="not-pass"),
        pytest.param("mx.example.com; spf=pass smtp.mailfrom=a@b; dkim=none; dmarc=none", "",
                     id="no-from"),
    ],
)
def test_dmarc_from_domain_reads_our_header(auth: str, expected: str) -> None:
    assert dmarc_from_domain(_job(auth=auth)) == expected


@pytest.mark.parametrize(
    ("record", "from_domain"),
    [
        pytest.param(DmarcRecord("reject", "reject"), "example.net", id="with-record"),
        pytest.param(None, "mail.example.net", id="without-record-comment"),
    ],
)
def test_dmarc_from_domain_reads_what_the_milter_writes(record: DmarcRecord | None,
                                                        from_domain: str) -> None:
    value = authentication_results(
        "mx.example.com", SpfResult("fail", "mailfrom", "a@example.net", "example.net"),
        [DkimResult("pass", "example.net", "s1", "abcdefghijkl")],
        DmarcResult("pass", from_domain, record))
    assert dmarc_from_domain(_job(auth=value)) == from_domain


@pytest.mark.parametrize(
    ("address", "key"),
    [
        pytest.param("192.0.2.1", "192.0.2.1", id="ipv4"),
        pytest.param("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64", id="ipv6-by-64"),
        pytest.param("2001:db8:1:2::ffff", "2001:db8:1:2::/64", id="same-64"),
        pytest.param("localhost", "localhost", id="not-an-ip"),
        pytest.param("", "-", id="empty"),
    ],
)
def test_client_key(address: str, key: str) -> None:
    assert client_key(address) == key


def _limits(per_sender: int = 2, per_client: int = 3, period: float = 60.0) -> Any:
    return SimpleNamespace(bounce_rate_per_sender=per_sender,
                           bounce_rate_per_client=per_client, bounce_rate_period=period)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        pytest.param([("a@x", "192.0.2.1")] * 3, ["", "", "sender-rate"],
                     id="per-sender"),
        pytest.param([("A@X", "192.0.2.1"), ("a@x", "192.0.2.2"), ("a@X", "192.0.2.3")],
                     ["", "", "sender-rate"], id="sender-case-folded"),
        pytest.param([("a@x", "192.0.2.1"), ("b@x", "192.0.2.1"), ("c@x", "192.0.2.1"),
                      ("d@x", "192.0.2.1")], ["", "", "", "client-rate"], id="per-client"),
        pytest.param([("a@x", "2001:db8::1"), ("b@x", "2001:db8::2"), ("c@x", "2001:db8::3"),
                      ("d@x", "2001:db8::4")], ["", "", "", "client-rate"],
                     id="ipv6-one-64-is-one-client"),
        pytest.param([("a@x", "2001:db8::1"), ("b@x", "2001:db8::2"), ("c@x", "2001:db8::3"),
                      ("d@x", "2001:db8:0:1::1")], ["", "", "", ""],
                     id="ipv6-another-64-is-another-client"),
    ],
)
def test_limits(calls: list[tuple[str, str]], expected: list[str]) -> None:
    limiter = BounceLimiter(clock=_Clock())
    got = [limiter.acquire(sender, client, _limits()) for sender, client in calls]
    assert got == expected


def test_a_refused_dsn_is_not_counted() -> None:
    limiter = BounceLimiter(clock=_Clock())
    limits = _limits(per_sender=1, per_client=2)
    assert limiter.acquire("a@x", "192.0.2.1", limits) == ""
    assert limiter.acquire("a@x", "192.0.2.1", limits) == "sender-rate"
    # The refused one took nothing from the client's count.
    assert limiter.acquire("b@x", "192.0.2.1", limits) == ""
    assert limiter.acquire("c@x", "192.0.2.1", limits) == "client-rate"


def test_window_ends_after_the_period() -> None:
    clock = _Clock()
    limiter = BounceLimiter(clock=clock)
    limits = _limits(per_sender=1, period=60)
    assert limiter.acquire("a@x", "192.0.2.1", limits) == ""
    clock.now += 59.9
    assert limiter.acquire("a@x", "192.0.2.1", limits) == "sender-rate"
    clock.now += 0.1
    assert limiter.acquire("a@x", "192.0.2.1", limits) == ""


def test_release_gives_the_count_back() -> None:
    limiter = BounceLimiter(clock=_Clock())
    limits = _limits(per_sender=1)
    assert limiter.acquire("a@x", "192.0.2.1", limits) == ""
    limiter.release("a@x", "192.0.2.1")
    assert limiter.acquire("a@x", "192.0.2.1", limits) == ""
    limiter.release("never@x", "192.0.2.9")  # nothing counted: nothing to give back


def test_memory_is_bounded_and_a_full_table_refuses() -> None:
    clock = _Clock()
    limiter = BounceLimiter(max_keys=100, clock=clock)
    limits = _limits(per_sender=5, per_client=10**6, period=60)
    results = [limiter.acquire(f"u{i}@x", "192.0.2.1", limits) for i in range(150)]
    assert results == [""] * 100 + ["sender-rate"] * 50
    assert len(limiter.senders.windows) == 100
    assert limiter.acquire("u0@x", "192.0.2.1", limits) == ""  # a known key still counts
    clock.now += 60  # every window over: room again, and the old keys are gone
    assert limiter.acquire("new@x", "192.0.2.1", limits) == ""
    assert list(limiter.senders.windows) == ["new@x"]
