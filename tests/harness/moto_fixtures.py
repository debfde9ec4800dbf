"""pytest plugin: the ``moto_server`` fixture (AWS emulated by moto in server mode).

Loaded from tests/conftest.py through ``pytest_plugins``.  One server per session on a
loopback port; every test gets it reset (``/moto-api/reset``: all AWS state, queued Lambda
results and the request recording are gone) and running again if a test left it stopped.
Without ``.venv-moto`` (``./run setup`` makes it) the tests skip, or fail under CI=true.
A failing test that used ``moto_server`` gets the tail of moto's log in its report.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

from harness import components
from harness.moto import MOTO_SERVER, MotoServer

_SERVER = pytest.StashKey[MotoServer]()


def require_moto() -> None:
    """Skip (fail in CI) unless the moto server venv exists."""
    components.require("moto server (.venv-moto, made by ./run setup)", str(MOTO_SERVER))


@pytest.fixture(scope="session")
def moto_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The session's moto server, started once; prefer ``moto_server``, which resets it."""
    require_moto()
    server = MotoServer(workdir=tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def moto_server(request: pytest.FixtureRequest, moto_server_session: MotoServer) -> MotoServer:
    """A running moto server with no AWS state, docker-free Lambda, empty Lambda queue."""
    server = moto_server_session
    if server.running:
        server.reset()
    else:  # a test stopped it (outage) and did not start it again
        server.start()
        server.reset()  # also clears the recording kept across the restart
    request.node.stash[_SERVER] = server
    return server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Attach the tail of moto's log to the report of a failed test that used it."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    server = item.stash.get(_SERVER, None)
    if report.failed and server is not None:
        report.sections.append((f"moto log tail: {server.log_path}", server.log_tail()))
