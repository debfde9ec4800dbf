"""mxrules against notifications real SES published (golden/ses_capture_*.json).

Each capture lists the headers SES saw, unfolded, and what SES made of them
(`headersTruncated`, the kept headers, `commonHeaders`).  Fed the same headers,
mxrules must make the same.  Where SES's input is not in the capture (the
headers after the cut, the encoded words SES decoded), the test says what it
rebuilt and why; docs/ses-evidence.md has the reasoning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.jobs import make_job
from mxrules.payload import HEADERS_LIMIT, common_headers, decoded_headers, mail_object
from mxrules.spool import Job

GOLDEN = Path(__file__).parent / "golden"
CAPTURES = sorted(p.name for p in GOLDEN.glob("ses_capture_*.json"))


def _capture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / name).read_text(encoding="utf-8"))
    assert data.pop("_source")["repository"]  # every capture names where it was published
    return data


def _headers(capture: dict[str, Any]) -> list[tuple[str, str]]:
    return [(h["name"], h["value"]) for h in capture["mail"]["headers"]]


def _job() -> Job:
    return make_job(message_id="m", queue_id="q", received_at="2024-10-04T16:31:14.331Z",
                    rule_set="r", mail_from="a@b", recipients=("c@d",),
                    hostname="mx.example", message_sha256="")


def test_captures_are_present() -> None:
    assert len(CAPTURES) >= 5


@pytest.mark.parametrize("name", CAPTURES)
def test_common_headers_match_ses(name: str) -> None:
    capture = _capture(name)
    assert common_headers(_headers(capture)) == capture["mail"]["commonHeaders"]


@pytest.mark.parametrize("name", CAPTURES)
def test_headers_listed_as_ses_lists_them(name: str) -> None:
    capture = _capture(name)
    mail = mail_object(_job(), _headers(capture), truncated=False)
    assert mail["headers"] == capture["mail"]["headers"]
    # What SES kept always fits; whether it dropped more is the next test's.
    assert mail["headersTruncated"] is False


# The capture has the 50 headers SES kept, not the ones it dropped.  The message
# came through Google Groups, whose headers sign themselves: the DKIM h= list of
# X-Google-DKIM-Signature names, bottom up, list-post above x-spam-checked-in-group,
# the last header kept.  So List-Post came next; its value is rebuilt in the form
# Google Groups writes it (any value of 7 bytes or more crosses the limit).
LIST_POST = ("List-Post", "<https://groups.google.com/a/febos.cl/group/61102025-2/post>, "
                          "<mailto:61102025-2@febos.cl>")


def test_headers_truncated_where_ses_cut() -> None:
    capture = _capture("ses_capture_2024_headers_truncated.json")
    kept = _headers(capture)
    assert sum(len(n.encode()) + len(v.encode()) for n, v in kept) == 10_234
    mail = mail_object(_job(), [*kept, LIST_POST, ("List-Help", "<mailto:x@y>")],
                       truncated=False)
    assert mail["headersTruncated"] is True
    assert mail["headers"] == capture["mail"]["headers"]  # all 50, not 45
    assert mail["commonHeaders"] == capture["mail"]["commonHeaders"]


@pytest.mark.parametrize(
    ("extra", "truncated"),
    [
        pytest.param(("X-A", "b" * 3), False, id="6-bytes-fit"),
        pytest.param(("X-A", "b" * 4), True, id="7-bytes-do-not"),
    ],
)
def test_limit_is_on_names_and_values(extra: tuple[str, str], truncated: bool) -> None:
    kept = _headers(_capture("ses_capture_2024_headers_truncated.json"))
    mail = mail_object(_job(), [*kept, extra], truncated=False)
    assert 10_234 + len(extra[0]) + len(extra[1]) - HEADERS_LIMIT == (1 if truncated else 0)
    assert mail["headersTruncated"] is truncated
    assert len(mail["headers"]) == 50 + (0 if truncated else 1)


# PHPMailer 5.2.28 (the capture's X-Mailer) writes a From name or Subject with
# 8-bit characters as Q-encoded words of at most 75 characters; SES listed both
# decoded.  These are the encoded forms PHPMailer gives for the capture's text.
PHPMAILER_FROM = ("=?UTF-8?Q?Facturaci=C3=B3n_Electr=C3=B3nica_-_DIRECCION_GENERAL_DE_PROMO?="
                  "\r\n =?UTF-8?Q?CION_DE_EXPORTACIONES?= <facturacion@i2dtechnik.cl>")
PHPMAILER_SUBJECT = ("=?UTF-8?Q?Facturaci=C3=B3n_Electr=C3=B3nica_-_DIRECCION_GENERAL_DE_PROMO?="
                     "\r\n =?UTF-8?Q?CION_DE_EXPORTACIONES?=")


def test_encoded_words_decoded_as_ses_did() -> None:
    capture = _capture("ses_capture_2024_encoded_words.json")
    unfold = " ".join  # mxrules unfolds before decoding, as SES does
    raw = [(n, unfold(PHPMAILER_FROM.split("\r\n ")) if n == "From" else
            unfold(PHPMAILER_SUBJECT.split("\r\n ")) if n == "Subject" else v)
           for n, v in _headers(capture)]
    assert any("=?UTF-8?" in v for _n, v in raw)
    assert decoded_headers(raw) == _headers(capture)
    assert common_headers(raw) == capture["mail"]["commonHeaders"]
