"""Missing external components: skip on a developer machine, fail in CI.

A CI job that silently skips the Postfix tests would report green while testing
nothing, so with CI=true an absent component is an error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def in_ci() -> bool:
    """True when the environment says we run in CI (CI=true, as most CI services set)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the test locally, fail it in CI."""
    if in_ci():
        pytest.fail(f"required component unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def which(cmd: str) -> str | None:
    """Locate a command on PATH and in the sbin directories (often absent from a user's PATH)."""
    path = os.pathsep.join(filter(None, [os.environ.get("PATH"), _SBIN_PATH]))
    return shutil.which(cmd, path=path)


def require(name: str, *paths_or_cmds: str) -> list[str]:
    """Ensure every file (absolute path) or command (bare name) exists; return resolved paths.

    ``name`` is the component shown in the skip/fail message, e.g. "Postfix".
    """
    found: list[str] = []
    missing: list[str] = []
    for item in paths_or_cmds:
        resolved = (item if Path(item).exists() else None) if os.sep in item else which(item)
        if resolved is None:
            missing.append(item)
        else:
            found.append(resolved)
    if missing:
        unavailable(f"{name} is not available: missing {', '.join(missing)}")
    return found
