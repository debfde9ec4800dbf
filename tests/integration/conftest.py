"""Fixtures for integration tests: a whole receiving stack per test.

`rules_source` runs every stack test twice: rules from mxrules YAML, and from
SES's own JSON exports, so both inputs are proved to behave the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from harness.mxrules_proc import MilterProcess
from harness.ports import free_port
from harness.sink import SmtpSink
from harness.stack import Stack, write_config


@pytest.fixture(params=["yaml", "ses"])
def rules_source(request: pytest.FixtureRequest) -> str:
    """Every stack test runs twice: rules from YAML, and from SES's JSON exports."""
    return str(request.param)


@pytest.fixture
def make_stack(tmp_path_factory: pytest.TempPathFactory, postfix_factory: Any,
               smtp_sink: SmtpSink) -> Iterator[Any]:
    milters: list[MilterProcess] = []

    def make(source: str = "yaml", **config: Any) -> Stack:
        directory = tmp_path_factory.mktemp("mx")
        port = free_port()
        path = write_config(directory, source=source, port=port, **config)
        milter = MilterProcess(path, port, directory / "milter.log")
        milters.append(milter)  # before start(): a milter that fails to listen is stopped too
        milter.start()
        postfix = postfix_factory(milter=milter.postfix_spec, relay_port=smtp_sink.port)
        return Stack(directory, milter, postfix, smtp_sink, source)

    yield make
    for m in milters:
        m.stop()


@pytest.fixture
def stack(make_stack: Any, rules_source: str) -> Stack:
    s: Stack = make_stack(rules_source)
    return s
