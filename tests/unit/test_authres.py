"""The authserv-id of an incoming Authentication-Results, read as RFC 8601 §2.2 defines it,
and the verdict headers only this host writes."""

from __future__ import annotations

import pytest

from harness.jobs import make_job
from mxrules.authres import authserv_id, claims, forged, verdict_headers
from mxrules.milter.scanning import ScanOutcome
from mxrules.payload import ses_prepended_headers
from mxrules.scan import DISABLED, Verdict
from mxrules.spool import Job


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(b"mx.test; spf=pass", "mx.test", id="token"),
        pytest.param(b" mx.test;spf=pass", "mx.test", id="leading-space"),
        pytest.param(b"mx.test 1; spf=pass", "mx.test", id="with-version"),
        pytest.param(b"mx.test; none", "mx.test", id="no-result"),
        pytest.param(b"(x) mx.test; spf=pass", "mx.test", id="comment-first"),
        pytest.param(b"(a (b (c)) d) mx.test; spf=pass", "mx.test", id="nested-comment"),
        pytest.param(b"(a \\) b) mx.test; spf=pass", "mx.test", id="quoted-pair-in-comment"),
        pytest.param(b"(a \\( b) mx.test; spf=pass", "mx.test", id="escaped-open-paren"),
        pytest.param(b"(one)(two) \r\n\t(three)mx.test; spf=pass", "mx.test",
                     id="comments-and-folding"),
        pytest.param(b'"mx.test"; dkim=pass', "mx.test", id="quoted-string"),
        pytest.param(b'(c) "mx.test" 1; dkim=pass', "mx.test", id="comment-then-quoted"),
        pytest.param(b'"mx\\.te\\st"; dkim=pass', "mx.test", id="quoted-pairs-unquoted"),
        pytest.param(b'"mx.test\\"x"; dkim=pass', 'mx.test"x', id="escaped-quote-kept"),
        pytest.param(b"mx.test(c); spf=pass", "mx.test", id="comment-ends-token"),
        pytest.param(b"mx.test/x; spf=pass", "mx.test", id="tspecial-ends-token"),
        pytest.param(b"MX.Test; spf=pass", "MX.Test", id="case-kept-by-the-parser"),
        pytest.param("m\u00fcx.test; spf=pass".encode(), "m\u00fcx.test", id="utf8-id"),
        pytest.param(b"; spf=pass", None, id="no-id"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b"   \r\n\t ", None, id="only-whitespace"),
        pytest.param(b"(only a comment)", None, id="only-comment"),
        pytest.param(b"(unclosed mx.test; spf=pass", None, id="unclosed-comment"),
        pytest.param(b'"mx.test; dkim=pass', None, id="unclosed-quote"),
        pytest.param(b'""; dkim=pass', None, id="empty-quoted"),
        pytest.param(b"(" * 50_000 + b"mx.test", None, id="deep-unclosed-nesting"),
        pytest.param(b"(" * 50_000 + b")" * 50_000 + b" mx.test;", "mx.test",
                     id="deep-closed-nesting"),
    ],
)
def test_authserv_id(value: bytes, expected: str | None) -> None:
    assert authserv_id(value) == expected


@pytest.mark.parametrize(
    ("value", "host", "ours"),
    [
        pytest.param(b"(x) mx.test; spf=pass", "mx.test", True, id="comment-form"),
        pytest.param(b'"mx.test"; dkim=pass', "mx.test", True, id="quoted-form"),
        pytest.param(b"MX.TEST; spf=pass", "mx.test", True, id="case-insensitive"),
        pytest.param(b"mx.test.; spf=pass", "MX.test", True, id="trailing-dot"),
        pytest.param(b"mx.test; spf=pass", "mx.test.", True, id="trailing-dot-configured"),
        pytest.param(b"(mx.test) other.test; spf=pass", "mx.test", False, id="ours-in-comment"),
        pytest.param(b"mx.test.evil; spf=pass", "mx.test", False, id="longer-name"),
        pytest.param(b"xmx.test; spf=pass", "mx.test", False, id="suffix-only"),
        pytest.param(b'"mx .test"; spf=pass', "mx.test", False, id="space-inside-quotes"),
        pytest.param(b"; spf=pass", "mx.test", False, id="no-id"),
    ],
)
def test_claims(value: bytes, host: str, ours: bool) -> None:
    assert claims(value, host) is ours


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        pytest.param("Authentication-Results", b" (x) mx.test; spf=pass", True, id="ar-ours"),
        pytest.param("AUTHENTICATION-RESULTS", b" mx.test; spf=pass", True, id="ar-name-case"),
        pytest.param("Authentication-Results", b" other.test; spf=pass", False,
                     id="ar-someone-else"),
        pytest.param("X-SES-Spam-Verdict", b" PASS", True, id="spam-verdict"),
        pytest.param("x-ses-virus-verdict", b" PASS", True, id="virus-verdict-lower"),
        pytest.param("X-SES-Spam-Verdict ", b" PASS", True, id="space-before-colon"),
        pytest.param("X-SES-RECEIPT", b" AEFBQ", False, id="receipt-not-ours"),
        pytest.param("Received-SPF", b" pass (mx.test: forged)", False, id="received-spf-kept"),
        pytest.param("ARC-Authentication-Results", b" i=1; mx.test; spf=pass", False,
                     id="arc-kept"),
    ],
)
def test_forged(name: str, value: bytes, expected: bool) -> None:
    assert forged(name, value, "mx.test") is expected


def _statuses_job(spam: str | None, virus: str | None) -> Job:
    verdicts = {k: v for k, v in (("spam", spam), ("virus", virus)) if v is not None}
    return make_job(message_id="m", queue_id="", rule_set="", mail_from="a@example.net",
                    recipients=("b@example.com",), message_sha256="", verdicts=verdicts)


# One row per pair of scan results; the milter's copy (ScanOutcome.headers) and the
# stored copy (ses_prepended_headers) must both write exactly `expected`.
@pytest.mark.parametrize(("spam", "virus", "expected"), [
    pytest.param("PASS", "PASS", [("X-SES-Spam-Verdict", "PASS"), ("X-SES-Virus-Verdict", "PASS")],
                 id="both"),
    pytest.param("FAIL", "PROCESSING_FAILED",
                 [("X-SES-Spam-Verdict", "FAIL"), ("X-SES-Virus-Verdict", "PROCESSING_FAILED")],
                 id="fail-and-failed"),
    pytest.param("DISABLED", "GRAY", [("X-SES-Virus-Verdict", "GRAY")], id="spam-not-run"),
    pytest.param("DISABLED", "DISABLED", [], id="none-run"),
    pytest.param(None, None, [], id="none-recorded"),
])
def test_verdict_headers(spam: str | None, virus: str | None,
                         expected: list[tuple[str, str]]) -> None:
    statuses = {k: v for k, v in (("spam", spam), ("virus", virus)) if v is not None}
    assert verdict_headers(statuses) == expected
    outcome = ScanOutcome({k: Verdict(v) if v else DISABLED  # type: ignore[arg-type]
                           for k, v in (("spam", spam), ("virus", virus))})
    assert outcome.headers() == expected
    written = [h for h in ses_prepended_headers(_statuses_job(spam, virus))
               if h[0].startswith("X-SES-")]
    assert written == expected
