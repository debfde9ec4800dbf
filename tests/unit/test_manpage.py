"""mxrules(8) and mxrules.yaml(5): written from the parser and the schema, and they render."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.components import unavailable
from mxrules import cli, manpage


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("man")
    assert manpage.main(["--out", str(out)]) == 0
    return out


def render(path: Path) -> tuple[str, str]:
    if not shutil.which("man"):
        unavailable("man (Debian's man-db) is not installed")
    proc = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                          text=True, env={**os.environ, "MANWIDTH": "100"},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def _flat(text: str) -> str:
    """The rendered page as one line: man fills and hyphenates across line ends."""
    return " ".join(text.replace("\u2010\n", "").replace("-\n", "-").split())


def _names(schema: Any) -> set[str]:
    """Every property name anywhere in the schema."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for name, sub in schema.get("properties", {}).items():
            found.add(name)
            found |= _names(sub)
        for key, sub in schema.items():
            if key != "properties":
                found |= _names(sub)
    elif isinstance(schema, list):
        for item in schema:
            found |= _names(item)
    return found


def test_mxrules_8_renders_without_warnings_and_names_every_command(pages: Path) -> None:
    text, warnings = render(pages / "mxrules.8")
    assert warnings == ""
    flat = _flat(text)
    assert flat.startswith("MXRULES(8)")
    top = cli._parser()
    commands = next(a for a in top._actions if a.dest == "command").choices
    assert commands
    for name in commands:
        assert f"mxrules {name}" in flat, name
    for option in ("--once", "--client-ip", "--all-failed", "--state", "--json"):
        assert option in flat, option
    for section in ("SIGNALS", "FILES", "EXIT STATUS", "SEE ALSO"):
        assert section in text


def test_every_schema_key_is_in_mxrules_yaml_5(pages: Path) -> None:
    text, warnings = render(pages / "mxrules.yaml.5")
    assert warnings == ""
    schema = manpage.schema_document()
    names = _names(schema)
    assert {"milter", "socket_mode", "bucket_name", "invocation_type", "tls_policy",
            "retry_window", "on_failure"} <= names
    # Each key by its full path, as the page lists it (rendered, then unwrapped).
    flat = _flat(text)
    paths = [key.path for key in manpage.walk(schema, schema)]
    for name in names:
        assert any(p == name or p.endswith("." + name) for p in paths), name
    for path in paths:
        assert path in flat, path


def _defaults(schema: Any) -> set[str]:
    """The name of every property that has a default, anywhere in the schema."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for name, sub in schema.get("properties", {}).items():
            if isinstance(sub, dict) and "default" in sub:
                found.add(name)
        for sub in schema.values():
            found |= _defaults(sub)
    elif isinstance(schema, list):
        for item in schema:
            found |= _defaults(item)
    return found


def test_every_default_in_the_schema_is_in_mxrules_yaml_5(pages: Path) -> None:
    text, _ = render(pages / "mxrules.yaml.5")
    flat = _flat(text).replace("\u2212", "-").replace("\u2010", "-")
    schema = manpage.schema_document()
    keys = list(manpage.walk(schema, schema))
    with_default = [key for key in keys if "default" in key.schema]
    assert {"listen", "threads", "failed_max_size", "per_client_ip", "enabled",
            "encoding", "invocation_type"} <= {k.path.rsplit(".", 1)[-1] for k in with_default}
    # Every default the schema holds, reached through the keys the page lists.
    assert _defaults(schema) == {k.path.rsplit(".", 1)[-1] for k in with_default}
    # Each key's entry on the page runs from its path to the next key's path.
    starts = []
    at = 0
    for key in keys:
        at = flat.index(f"{key.path} ", at)
        starts.append(at)
    for i, key in enumerate(keys):
        if "default" in key.schema:
            entry = flat[starts[i]:starts[i + 1] if i + 1 < len(keys) else len(flat)]
            assert f"default {json.dumps(key.schema['default'])}." in entry, (key.path, entry)


def test_schema_descriptions_reach_the_page(pages: Path) -> None:
    schema = manpage.schema_document()
    listen = schema["properties"]["milter"]["properties"]["listen"]["description"]
    text = (pages / "mxrules.yaml.5").read_text()
    assert manpage.roff(listen.split(".")[0]) in text


def test_roff_escapes_what_roff_would_eat() -> None:
    assert manpage.roff(".dot") == "\\&.dot"
    assert manpage.roff("'quote") == "\\&'quote"
    assert manpage.roff("a\\b-c") == "a\\eb\\-c"
