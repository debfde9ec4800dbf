"""The verdict names (mxrules.verdicts) against the places that spell them out."""

from __future__ import annotations

import pytest

from mxrules import verdicts
from mxrules.authres import VERDICT_HEADERS, verdict_headers
from mxrules.configschema import schema


@pytest.mark.parametrize(("name", "field"), [
    pytest.param("spam", "spamVerdict", id="spam"),
    pytest.param("virus", "virusVerdict", id="virus"),
    pytest.param("spf", "spfVerdict", id="spf"),
    pytest.param("dkim", "dkimVerdict", id="dkim"),
    pytest.param("dmarc", "dmarcVerdict", id="dmarc"),
])
def test_payload_field(name: str, field: str) -> None:
    assert name in verdicts.VERDICTS
    assert verdicts.payload_field(name) == field


def test_every_scanned_verdict_has_a_scanner_section_and_a_header() -> None:
    sections = schema()["properties"]["scan"]["properties"]
    assert all(name in sections for name in verdicts.SCANNED)
    assert len(VERDICT_HEADERS) == len(verdicts.SCANNED)


@pytest.mark.parametrize(("statuses", "headers"), [
    pytest.param({"spam": "PASS", "virus": "FAIL"},
                 [("X-SES-Spam-Verdict", "PASS"), ("X-SES-Virus-Verdict", "FAIL")], id="both"),
    pytest.param({"spam": "DISABLED", "virus": "GRAY"},
                 [("X-SES-Virus-Verdict", "GRAY")], id="spam-not-run"),
    pytest.param(verdicts.all_disabled(), [], id="none-run"),
])
def test_verdict_headers(statuses: dict[str, str], headers: list[tuple[str, str]]) -> None:
    assert verdict_headers(statuses) == headers
