"""pytest plugin: the ``smtp_sink`` and ``postfix_factory`` fixtures.

Loaded from tests/conftest.py through ``pytest_plugins``.  A failing test that used
``postfix_factory`` gets the tail of every instance's maillog in its report.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

from harness import components
from harness.ports import free_port
from harness.postfix import MAIL_OWNER, SETGID_GROUP, Postfix
from harness.sink import SmtpSink

_INSTANCES = pytest.StashKey[list[Postfix]]()
_FAILED = pytest.StashKey[bool]()


class PostfixFactory(Protocol):
    """Signature of the callable that ``postfix_factory`` yields."""

    def __call__(
        self,
        *,
        milter: str | None = None,
        relay_port: int | None = None,
        tls: bool = True,
        extra: Mapping[str, str] | None = None,
    ) -> Postfix: ...


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A started SMTP sink on a free loopback port, stopped after the test."""
    with SmtpSink() as sink:
        yield sink


def require_postfix() -> None:
    """Skip (fail in CI) unless a Postfix we can start is installed and we are root."""
    components.require("Postfix", "postfix", "postconf", "openssl")
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except KeyError:
        components.unavailable(f"Postfix needs the {MAIL_OWNER} user and {SETGID_GROUP} group")
    if os.geteuid() != 0:
        components.unavailable("starting a Postfix instance needs root")


def instance_dir() -> Path:
    """A fresh directory for one Postfix instance, outside pytest's temporary tree.

    master(8) opens data_directory/master.lock as mail_owner by absolute path, so
    mail_owner must be able to enter every ancestor.  pytest's tree is 0700 and every
    new pytest session re-tightens /tmp/pytest-of-<user>, even while we run; hence a
    0711 directory directly in the system temporary directory.
    """
    workdir = Path(tempfile.mkdtemp(prefix="mxrules-postfix-"))
    workdir.chmod(0o711)  # Postfix.start() reports an ancestor that is still closed
    return workdir


@pytest.fixture
def postfix_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostfixFactory]:
    """Make started Postfix instances (fresh dir, free port); all are stopped at teardown."""
    require_postfix()
    instances: list[Postfix] = []
    request.node.stash[_INSTANCES] = instances

    def make(
        *,
        milter: str | None = None,
        relay_port: int | None = None,
        tls: bool = True,
        extra: Mapping[str, str] | None = None,
    ) -> Postfix:
        workdir = instance_dir()
        # Findable from pytest's temporary tree, which itself cannot host the instance.
        (tmp_path_factory.mktemp("postfix") / "workdir").symlink_to(workdir)
        instance = Postfix(
            workdir=workdir,
            smtp_port=free_port(),
            milter=milter,
            relay_port=relay_port,
            tls=tls,
            extra=extra,
        )
        instances.append(instance)
        instance.start()
        return instance

    yield make

    errors: list[str] = []
    for instance in instances:
        try:
            instance.stop()
        except Exception as exc:
            errors.append(f"{instance}: {exc}\n{instance.log_tail()}")
        else:
            # Kept after a failure for post-mortems (its path is in the report).
            if not request.node.stash.get(_FAILED, False):
                shutil.rmtree(instance.workdir, ignore_errors=True)
    if errors:
        pytest.fail("could not stop Postfix:\n" + "\n".join(errors), pytrace=False)


@pytest.hookimpl(hookwrapper=True)  # type: ignore[untyped-decorator]
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Attach each Postfix instance's maillog tail to a failed test's report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        item.stash[_FAILED] = True
        for instance in item.stash.get(_INSTANCES, []):
            report.sections.append((f"maillog tail: {instance.maillog_path}", instance.log_tail()))
