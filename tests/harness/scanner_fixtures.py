"""pytest plugin: real spamd, clamd and rspamd on loopback, and a scanner that hangs.

Loaded from tests/conftest.py through ``pytest_plugins``.  Each server is started once
per session, on first use, from its own directory (see harness.scanners), and stopped at
the end.  The function-scoped fixtures (``spamd``, ``clamd``, ``clamd_small``,
``rspamd``) hand out the session's server, started again first if a test stopped it
(an outage test): read ``address`` / ``unix_address`` from them after that.  Without
the daemon the tests skip, or fail under CI=true.  A failing test that used a server
gets the tail of its log in the report; the session summary shows how long each server
took to start.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness import components
from harness.scanners import (
    STARTUP_TIMES,
    Clamd,
    HangingServer,
    Rspamd,
    ScannerProcess,
    Spamd,
)

_USED = pytest.StashKey[list[ScannerProcess]]()
_Server = TypeVar("_Server", bound=ScannerProcess)


def require_spamd() -> None:
    """Skip (fail in CI) unless spamd, the stock rules and the plugin .pre files exist."""
    components.require("SpamAssassin spamd", "spamd", str(Spamd.RULES_DIR))
    if not Spamd.pre_files():
        components.unavailable(
            "SpamAssassin's *.pre files (loadplugin lines) are missing from "
            + " and ".join(str(d) for d in Spamd.SITE_DIRS)
        )
    if os.geteuid() == 0 and not Spamd.unprivileged_user_exists():
        components.unavailable("spamd started as root needs the user nobody to scan as")


def require_clamd() -> None:
    components.require("ClamAV clamd", "clamd")


def require_rspamd() -> None:
    components.require("rspamd", "rspamd", str(Rspamd.CONFDIR / "common.conf"))


def _session_server(server: _Server) -> Iterator[_Server]:
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def spamd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spamd]:
    """The session's spamd; prefer ``spamd``, which starts it again after an outage test."""
    require_spamd()
    yield from _session_server(Spamd(tmp_path_factory.mktemp("spamd")))


@pytest.fixture(scope="session")
def clamd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """The session's clamd (StreamMaxLength 64M); prefer ``clamd``."""
    require_clamd()
    yield from _session_server(Clamd(tmp_path_factory.mktemp("clamd")))


@pytest.fixture(scope="session")
def clamd_small_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """A clamd with small limits, for the size-limit paths; prefer ``clamd_small``.

    StreamMaxLength 2M (INSTREAM refuses longer messages); MaxFileSize and MaxScanSize
    1M with AlertExceedsMax, so a message between 1M and 2M is only partly scanned and
    clamd says so (Heuristics.Limits.Exceeded.*).
    """
    require_clamd()
    server = Clamd(
        tmp_path_factory.mktemp("clamd-small"),
        stream_max_length="2M",
        options={"MaxFileSize": "1M", "MaxScanSize": "1M", "AlertExceedsMax": "yes"},
    )
    yield from _session_server(server)


@pytest.fixture(scope="session")
def rspamd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    """The session's rspamd; prefer ``rspamd``."""
    require_rspamd()
    yield from _session_server(Rspamd(tmp_path_factory.mktemp("rspamd")))


def _running(request: pytest.FixtureRequest, server: _Server) -> _Server:
    if not server.running:  # a test stopped it (outage) and did not start it again
        server.start()
    request.node.stash.setdefault(_USED, []).append(server)
    return server


@pytest.fixture
def spamd(request: pytest.FixtureRequest, spamd_session: Spamd) -> Spamd:
    """A running spamd (TCP ``address``, ``unix_address``); GTUBE scores 1000."""
    return _running(request, spamd_session)


@pytest.fixture
def clamd(request: pytest.FixtureRequest, clamd_session: Clamd) -> Clamd:
    """A running clamd knowing only the EICAR test file (scanners.EICAR_SIGNATURE)."""
    return _running(request, clamd_session)


@pytest.fixture
def clamd_small(request: pytest.FixtureRequest, clamd_small_session: Clamd) -> Clamd:
    """A running clamd with StreamMaxLength 2M (see ``clamd_small_session``)."""
    return _running(request, clamd_small_session)


@pytest.fixture
def rspamd(request: pytest.FixtureRequest, rspamd_session: Rspamd) -> Rspamd:
    """A running rspamd (TCP ``address`` for HTTP, ``unix_address``)."""
    return _running(request, rspamd_session)


@pytest.fixture
def hanging_server() -> Iterator[HangingServer]:
    """A TCP server that accepts connections and never answers (a stuck scanner)."""
    with HangingServer() as server:
        yield server


@pytest.fixture
def message_file(tmp_path: Path) -> Any:
    """Write raw message bytes to a file (as the milter spools them); return its path."""
    counter = 0

    def write(data: bytes) -> str:
        nonlocal counter
        counter += 1
        path = tmp_path / f"message-{counter}.eml"
        path.write_bytes(data)
        return str(path)

    return write


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Attach the tail of every scanner log to the report of a failed test that used one."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for server in item.stash.get(_USED, []):
            report.sections.append((f"{server.name} log tail: {server.log_path}",
                                    server.log_tail()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Start-up times of the scanners this session started (to budget CI time)."""
    if STARTUP_TIMES:
        times = ", ".join(
            f"{name} {' + '.join(f'{t:.1f}s' for t in values)}"
            for name, values in sorted(STARTUP_TIMES.items())
        )
        terminalreporter.write_line(f"scanner start-up: {times}")
