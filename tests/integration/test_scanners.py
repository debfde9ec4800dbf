"""The spam and virus scanner clients against real spamd, clamd and rspamd.

What SES does: docs/ses-compatibility.md, "Authentication and scans".

Servers come from harness.scanner_fixtures (started once per session, offline).  Every
failure mode must give PROCESSING_FAILED with a clear detail, never an exception and
never PASS: scanner stopped, scanner hanging, message over a size limit.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.scanners import (
    EICAR_SIGNATURE,
    GTUBE,
    RSPAMD_ADD_HEADER_SUBJECT,
    RSPAMD_GREYLIST_SUBJECT,
    Clamd,
    HangingServer,
    Rspamd,
    ScannerProcess,
    Spamd,
    eicar,
    message,
)
from mxrules.scan import Verdict
from mxrules.scan.spam import RSPAMD_ACTIONS, rspamd_action_status, scan_rspamd, scan_spamd
from mxrules.scan.virus import scan_clamd

MessageFile = Callable[[bytes], str]

MAX_SIZE = 40 * 1024 * 1024  # SES accepts messages up to 40 MB
TIMEOUT = 30.0  # generous: a correctness bound, not a speed target



def spamd_scan(address: str, path: str, timeout: float = TIMEOUT) -> Verdict:
    return scan_spamd(address, path, timeout=timeout, max_size=MAX_SIZE)


def clamd_scan(address: str, path: str, timeout: float = TIMEOUT) -> Verdict:
    return scan_clamd(address, path, timeout=timeout, max_size=MAX_SIZE)


def rspamd_scan(address: str, path: str, timeout: float = TIMEOUT) -> Verdict:
    # What the milter knows about the SMTP session.
    return scan_rspamd(
        address, path, timeout=timeout, max_size=MAX_SIZE, client_ip="192.0.2.10",
        hostname="mail.example.com", helo="mail.example.com", sender="alice@example.com",
        recipients=["bob@example.org"],
    )


SCANS: dict[str, Callable[[str, str, float], Verdict]] = {
    "spamd": spamd_scan,
    "clamd": clamd_scan,
    "rspamd": rspamd_scan,
}


def gtube_message() -> bytes:
    return message("Test spam", f"This is the GTUBE:\n{GTUBE}\n")


def eicar_message() -> bytes:
    return message("The file you asked for", "See attached.\n", attachment=("eicar.com", eicar()))


def big_file(path: Path, size: int) -> str:
    """A clean message of ``size`` bytes, written in pieces (never whole in memory here)."""
    line = b"All work and no play makes Jack a dull boy, said the test message.\r\n"
    with path.open("wb") as f:
        f.write(message("A long letter", "Here it comes.\n"))
        while f.tell() < size:
            f.write(line * min(4096, (size - f.tell()) // len(line) + 1))
    return str(path)


# -- spamd ---------------------------------------------------------------------------------


def test_spamd_flags_gtube(spamd: Spamd, message_file: MessageFile) -> None:
    verdict = spamd_scan(spamd.address, message_file(gtube_message()))

    assert verdict.status == "FAIL", verdict
    assert verdict.score is not None and verdict.score >= 1000
    score, threshold = verdict.detail.split("/")
    assert float(score) == verdict.score
    assert float(threshold) == 5.0


def test_spamd_passes_an_ordinary_message(spamd: Spamd, message_file: MessageFile) -> None:
    verdict = spamd_scan(spamd.address, message_file(message()))

    assert verdict.status == "PASS", verdict
    assert verdict.score is not None and verdict.score < 5.0
    assert verdict.detail.endswith("/5.0")


def test_spamd_over_a_unix_socket(spamd: Spamd, message_file: MessageFile) -> None:
    assert spamd_scan(spamd.unix_address, message_file(gtube_message())).status == "FAIL"
    assert spamd_scan(spamd.unix_address, message_file(message())).status == "PASS"


def test_spamd_message_without_a_final_newline(spamd: Spamd, message_file: MessageFile) -> None:
    """spamd reads lines: the client must half-close, or spamd waits for the last newline."""
    data = gtube_message().rstrip(b"\r\n")
    assert not data.endswith(b"\n")

    verdict = spamd_scan(spamd.address, message_file(data), timeout=10)

    assert verdict.status == "FAIL", verdict


def test_spamd_with_a_user(spamd: Spamd, message_file: MessageFile) -> None:
    verdict = scan_spamd(
        spamd.address, message_file(gtube_message()), timeout=TIMEOUT, max_size=MAX_SIZE,
        user="postmaster",
    )
    assert verdict.status == "FAIL", verdict


def test_spamd_message_over_max_size_is_not_sent(
    hanging_server: HangingServer, message_file: MessageFile
) -> None:
    data = gtube_message()
    verdict = scan_spamd(
        hanging_server.address, message_file(data), timeout=TIMEOUT, max_size=len(data) - 1
    )

    assert verdict == Verdict("PROCESSING_FAILED", "message over the spam scanner's size limit")
    assert hanging_server.accepted == 0


# -- clamd ---------------------------------------------------------------------------------


def test_clamd_finds_eicar_attached_in_base64(clamd: Clamd, message_file: MessageFile) -> None:
    verdict = clamd_scan(clamd.address, message_file(eicar_message()))

    assert verdict == Verdict("FAIL", EICAR_SIGNATURE)


def test_clamd_passes_a_clean_message(clamd: Clamd, message_file: MessageFile) -> None:
    assert clamd_scan(clamd.address, message_file(message())) == Verdict("PASS", "OK")


def test_clamd_over_a_unix_socket(clamd: Clamd, message_file: MessageFile) -> None:
    assert clamd_scan(clamd.unix_address, message_file(eicar_message())).status == "FAIL"
    assert clamd_scan(clamd.unix_address, message_file(message())).status == "PASS"


def test_clamd_refuses_a_message_over_stream_max_length(
    clamd_small: Clamd, tmp_path: Path
) -> None:
    """3 MB against StreamMaxLength 2M: clamd stops reading, answers, and closes."""
    verdict = clamd_scan(clamd_small.address, big_file(tmp_path / "big.eml", 3_000_000))

    assert verdict.status == "PROCESSING_FAILED", verdict
    assert "INSTREAM size limit exceeded" in verdict.detail
    assert "StreamMaxLength" in verdict.detail


def test_clamd_message_only_partly_scanned_is_not_a_virus(
    clamd_small: Clamd, tmp_path: Path
) -> None:
    """1.5 MB against MaxScanSize 1M + AlertExceedsMax: clamd's Heuristics.Limits.Exceeded
    is no verdict on the message."""
    verdict = clamd_scan(clamd_small.address, big_file(tmp_path / "mid.eml", 1_500_000))

    assert verdict.status == "PROCESSING_FAILED", verdict
    assert "Heuristics.Limits.Exceeded" in verdict.detail


def test_clamd_message_over_max_size_is_not_sent(
    hanging_server: HangingServer, message_file: MessageFile
) -> None:
    data = eicar_message()
    verdict = scan_clamd(
        hanging_server.address, message_file(data), timeout=TIMEOUT, max_size=len(data) - 1
    )

    assert verdict == Verdict("PROCESSING_FAILED", "message over the virus scanner's size limit")
    assert hanging_server.accepted == 0


def test_clamd_streams_a_large_message(clamd: Clamd, tmp_path: Path) -> None:
    """30 MB go to clamd in chunks: the client never holds the message in memory."""
    path = big_file(tmp_path / "large.eml", 30_000_000)
    tracemalloc.start()
    try:
        verdict = clamd_scan(clamd.address, path, timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert verdict == Verdict("PASS", "OK")
    assert peak < 4_000_000, f"peak Python memory {peak} bytes while sending 30 MB"


# -- rspamd --------------------------------------------------------------------------------


def test_rspamd_flags_gtube(rspamd: Rspamd, message_file: MessageFile) -> None:
    verdict = rspamd_scan(rspamd.address, message_file(gtube_message()))

    assert verdict.status == "FAIL", verdict
    assert verdict.detail.startswith("reject ")


def test_rspamd_passes_an_ordinary_message(rspamd: Rspamd, message_file: MessageFile) -> None:
    verdict = rspamd_scan(rspamd.address, message_file(message()))

    assert verdict.status == "PASS", verdict
    assert verdict.detail.startswith("no action ")
    assert verdict.score is not None and verdict.score < 4


def test_rspamd_greylist_is_gray(rspamd: Rspamd, message_file: MessageFile) -> None:
    verdict = rspamd_scan(rspamd.address, message_file(message(RSPAMD_GREYLIST_SUBJECT)))

    assert verdict.status == "GRAY", verdict
    assert verdict.detail.startswith("greylist ")
    assert verdict.score is not None and 4 <= verdict.score < 6


def test_rspamd_add_header_is_fail(rspamd: Rspamd, message_file: MessageFile) -> None:
    verdict = rspamd_scan(rspamd.address, message_file(message(RSPAMD_ADD_HEADER_SUBJECT)))

    assert verdict.status == "FAIL", verdict
    assert verdict.detail.startswith("add header ")
    assert verdict.score is not None and 6 <= verdict.score < 15


def test_rspamd_over_a_unix_socket(rspamd: Rspamd, message_file: MessageFile) -> None:
    assert rspamd_scan(rspamd.unix_address, message_file(gtube_message())).status == "FAIL"
    assert rspamd_scan(rspamd.unix_address, message_file(message())).status == "PASS"


def test_rspamd_hostname_unknown_is_not_sent(rspamd: Rspamd, message_file: MessageFile) -> None:
    """Postfix's "unknown" and libmilter's "[address]" mean no rDNS: rspamd must see no
    Hostname (and score RDNS_NONE), not a host called "unknown"."""
    path = message_file(message())

    def score(hostname: str | None) -> float:
        verdict = scan_rspamd(
            rspamd.address, path, timeout=TIMEOUT, max_size=MAX_SIZE, client_ip="192.0.2.10",
            helo="mail.example.com", hostname=hostname,
        )
        assert verdict.score is not None, verdict
        return verdict.score

    assert score(None) == score("unknown") == score("[192.0.2.10]") > score("mail.example.com")


def test_rspamd_without_smtp_facts_and_with_a_null_sender(
    rspamd: Rspamd, message_file: MessageFile
) -> None:
    path = message_file(gtube_message())
    bare = scan_rspamd(rspamd.address, path, timeout=TIMEOUT, max_size=MAX_SIZE)
    bounce = scan_rspamd(
        rspamd.address, path, timeout=TIMEOUT, max_size=MAX_SIZE, sender="",
        recipients=["a@example.org", "b@example.org"], queue_id="4ABCDEF",
    )
    assert bare.status == bounce.status == "FAIL"


def test_rspamd_message_over_max_size_is_not_sent(
    hanging_server: HangingServer, message_file: MessageFile
) -> None:
    data = message()
    verdict = scan_rspamd(
        hanging_server.address, message_file(data), timeout=TIMEOUT, max_size=len(data) - 1
    )

    assert verdict == Verdict("PROCESSING_FAILED", "message over the spam scanner's size limit")
    assert hanging_server.accepted == 0


@pytest.mark.parametrize(
    ("action", "status"),
    [
        ("no action", "PASS"),
        ("greylist", "GRAY"),
        ("soft reject", "GRAY"),
        ("add header", "FAIL"),
        ("rewrite subject", "FAIL"),
        ("reject", "FAIL"),
        ("discard", "FAIL"),
        ("quarantine", "FAIL"),
        ("Reject", "FAIL"),
        ("my custom action", None),
    ],
)
def test_rspamd_action_mapping(action: str, status: str | None) -> None:
    assert rspamd_action_status(action) == status
    assert set(RSPAMD_ACTIONS.values()) <= {"PASS", "GRAY", "FAIL"}


# -- all scanners ------------------------------------------------------------------------


def test_concurrent_scans(
    spamd: Spamd, clamd: Clamd, rspamd: Rspamd, message_file: MessageFile
) -> None:
    """The milter scans from several threads at once: each call keeps to its own socket."""
    gtube, clean, virus = (message_file(m) for m in (gtube_message(), message(), eicar_message()))
    jobs = [
        (spamd_scan, spamd.address, gtube, "FAIL"),
        (spamd_scan, spamd.unix_address, clean, "PASS"),
        (clamd_scan, clamd.address, virus, "FAIL"),
        (clamd_scan, clamd.unix_address, clean, "PASS"),
        (rspamd_scan, rspamd.address, gtube, "FAIL"),
        (rspamd_scan, rspamd.unix_address, clean, "PASS"),
    ] * 3
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(scan, address, path) for scan, address, path, _ in jobs]
        results = [f.result() for f in futures]

    assert [r.status for r in results] == [expected for *_, expected in jobs], results


@pytest.mark.parametrize("name", SCANS)
@pytest.mark.parametrize("size", [0, 3_000_000], ids=["small", "3MB"])
def test_hanging_scanner_gives_processing_failed_at_the_deadline(
    name: str, size: int, hanging_server: HangingServer, message_file: MessageFile,
    tmp_path: Path,
) -> None:
    """A server that accepts and never answers: the deadline ends the wait.

    The 3 MB message fills the socket buffers, so the deadline is met while sending too.
    """
    path = big_file(tmp_path / "m.eml", size) if size else message_file(gtube_message())
    timeout = 1.0
    started = time.monotonic()
    verdict = SCANS[name](hanging_server.address, path, timeout)
    elapsed = time.monotonic() - started

    assert verdict.status == "PROCESSING_FAILED", verdict
    assert "no answer within 1s" in verdict.detail
    assert hanging_server.accepted == 1
    assert timeout - 0.05 <= elapsed < timeout + 2.0, elapsed


@pytest.mark.parametrize("name", SCANS)
def test_bad_address_or_missing_file_gives_processing_failed(
    name: str, tmp_path: Path, message_file: MessageFile
) -> None:
    scan = SCANS[name]
    missing = scan("127.0.0.1:1", str(tmp_path / "no-such-message.eml"), TIMEOUT)
    nonsense = scan("no-port-here", message_file(message()), TIMEOUT)

    assert missing.status == "PROCESSING_FAILED"
    assert "cannot read the message" in missing.detail
    assert nonsense.status == "PROCESSING_FAILED"
    assert "neither host:port nor unix:/path" in nonsense.detail


# Last in the file: stopping the session's server costs a restart for later users.
@pytest.mark.parametrize("name", SCANS)
def test_stopped_scanner_gives_processing_failed_quickly(
    name: str, request: pytest.FixtureRequest, message_file: MessageFile
) -> None:
    server: ScannerProcess = request.getfixturevalue(name)
    path = message_file(gtube_message())
    tcp, unix = server.address, server.unix_address
    server.stop()

    started = time.monotonic()
    over_tcp = SCANS[name](tcp, path, TIMEOUT)
    over_unix = SCANS[name](unix, path, TIMEOUT)
    elapsed = time.monotonic() - started

    assert over_tcp.status == "PROCESSING_FAILED", over_tcp
    assert "connection refused" in over_tcp.detail
    assert tcp in over_tcp.detail
    assert over_unix.status == "PROCESSING_FAILED", over_unix
    assert elapsed < 2.0, elapsed
