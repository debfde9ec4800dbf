"""Two consumer definitions of SES payloads that nobody here wrote.

- AWS Lambda Powertools' parser models (Python, pydantic): `SesModel` for the
  Lambda action's event; for an SNS notification, which Powertools has no model
  for, `SesMail` for `mail` and `SesReceiptVerdict` for each verdict.
- aws-lambda-go's `events` structs (tests/consumers/go/events/ses.go, kept
  with its licence): a small Go program decodes each payload into them.

What the checks prove: every field a consumer declares has the JSON type it
declares (Go: a string where a list is declared, a timestamp that is not
RFC 3339, a float where an int is declared all fail to decode; pydantic:
the same, plus Powertools' enumerations), and every field the payload has
beyond Go's structs is one of the SES fields listed in GO_EXTRA (Go's
decoder ignores unknown fields, so the Go program lists them instead).  Where
a consumer disagrees with what SES itself sends, the disagreement is listed
in POWERTOOLS_KNOWN or GO_MAY_LACK with the SES evidence, and the tests show
the same disagreement on SES's own payloads (tests/unit/golden/).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from harness import components

GO_DIR = Path(__file__).resolve().parent.parent / "consumers" / "go"

# SES fields aws-lambda-go does not declare, each seen in SES's own output or docs.
GO_EXTRA = frozenset({
    "mail.commonHeaders.sender",  # golden/ses_capture_2024_sender.json
    "mail.commonHeaders.replyTo",  # golden/ses_capture_2024_quoted_display_name.json
    "mail.commonHeaders.bcc",  # receiving-email-notifications-contents.md
    "receipt.action.objectKeyPrefix",  # every golden/ses_capture_2024_*.json
    "receipt.action.encoding",  # golden/notification_sns_base64.json
    "receipt.action.headerName",  # the AddHeader action's fields (SES API)
    "receipt.action.headerValue",
})
# Fields Go declares without omitempty that SES leaves out when there is nothing to say.
GO_MAY_LACK = frozenset({
    "mail.commonHeaders.from",  # golden/ses_capture_2024_empty_from.json
    "mail.commonHeaders.to",  # golden/ses_capture_2024_no_to.json
    "mail.commonHeaders.messageId",  # golden/ses_capture_2024_quoted_display_name.json
    "mail.commonHeaders.returnPath", "mail.commonHeaders.date", "mail.commonHeaders.subject",
    "receipt.dmarcPolicy",  # only with dmarcVerdict FAIL (notifications-contents)
})
# (field, pydantic error type, the value an enumeration refused) where Powertools
# rejects what SES itself sends.
POWERTOOLS_KNOWN = frozenset({
    ("mail.commonHeaders.sender", "list_type", None),  # a string: ses_capture_2024_sender
    ("mail.commonHeaders.from", "missing", None),  # no From address: ses_capture_2024_empty_from
    ("mail.commonHeaders.to", "missing", None),  # no To header: ses_capture_2024_no_to
    ("mail.commonHeaders.messageId", "missing", None),  # ses_capture_2024_quoted_display_name
    ("mail.commonHeaders.date", "missing", None),  # "fields present ... vary"
    ("mail.commonHeaders.subject", "missing", None),  # (receiving-email-notifications-contents.md)
    ("mail.commonHeaders.returnPath", "missing", None),
    # invocationType RequestResponse: receiving-email-notifications-contents.md
    ("receipt.action.invocationType", "literal_error", "RequestResponse"),
    # DISABLED: the verdict of a check that was not asked for
    *((f"receipt.{v}Verdict.status", "literal_error", "DISABLED")
      for v in ("spam", "virus", "spf", "dkim", "dmarc")),
})

Problem = tuple[str, str, str | None]


def require_powertools() -> None:
    """Skip (fail in CI) unless Powertools' parser is in the test venv (setup.cfg's test extra)."""
    if importlib.util.find_spec("aws_lambda_powertools") is None or \
            importlib.util.find_spec("pydantic") is None:
        components.unavailable("aws-lambda-powertools[parser] (pip, setup.cfg's test extra)")


def powertools_problems(payload: dict[str, Any]) -> list[Problem]:
    """Powertools' validation errors: (field path, error type, value an enumeration refused)."""
    from aws_lambda_powertools.utilities.parser.models.ses import (
        SesMail,
        SesModel,
        SesReceiptVerdict,
    )
    from pydantic import ValidationError

    checks: list[tuple[str, Any, Any]]
    if "Records" in payload:
        checks = [("", SesModel, payload)]
    else:
        checks = [("mail", SesMail, payload["mail"])]
        checks += [(f"receipt.{key}", SesReceiptVerdict, value)
                   for key, value in payload["receipt"].items() if key.endswith("Verdict")]
    problems: list[Problem] = []
    for prefix, model, value in checks:
        try:
            model.model_validate(value)
        except ValidationError as exc:
            problems += [(_path(prefix, err["loc"]), err["type"],
                          err["input"] if err["type"] == "literal_error" else None)
                         for err in exc.errors()]
    return problems


def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if parts[:2] == ["Records", "ses"]:
        parts = parts[2:]
    return ".".join([prefix, *parts] if prefix else parts)


def unexplained_powertools(payload: dict[str, Any]) -> list[Problem]:
    return [p for p in powertools_problems(payload) if p not in POWERTOOLS_KNOWN]


def require_go() -> None:
    components.require("Go (Debian's golang-go)", "go")


def build_go_check(workdir: Path) -> Path:
    """Compile the Go checker (standard library only, no network) into `workdir`."""
    require_go()
    binary = workdir / "sescheck"
    env = {**os.environ, "GOCACHE": str(workdir / "gocache"), "GOPATH": str(workdir / "gopath"),
           "GOPROXY": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=GO_DIR, env=env, check=True,
                   capture_output=True, timeout=300)
    return binary


def go_check(binary: Path, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each payload: Go's decoding error, unknown fields and lacking fields."""
    done = subprocess.run([str(binary)], input=json.dumps(payloads).encode(), check=True,
                          capture_output=True, timeout=120)
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def unexplained_go(result: dict[str, Any]) -> dict[str, Any]:
    """What in a Go result is neither a known SES extra nor a known SES omission."""
    return {
        "error": result["error"],
        "unknown": sorted(set(_flat(result["unknown"])) - GO_EXTRA),
        "missing": sorted(set(_flat(result["missing"])) - GO_MAY_LACK),
    }


def _flat(paths: list[str]) -> list[str]:
    # A Lambda event nests mail and receipt under Records[].ses.
    return [p.removeprefix("Records[].ses.") for p in paths]
