"""README's configuration reference table against the schema's defaults.

The schema is where a default is written; the README repeats it for readers.
Every row that names a value as its default must name the schema's, and a row
whose default is words ("the machine's FQDN", "—") must be for a key the schema
gives no default, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from mxrules import config

README = Path(__file__).resolve().parents[2] / "README.md"
UNITS = {"KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}


def table() -> list[tuple[str, str, str]]:
    """The rows (key, default, meaning) of the table under "## Configuration reference"."""
    section = README.read_text("utf-8").split("## Configuration reference", 1)[1]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells[0] not in ("key", "---"):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def keys(cell: str) -> list[str]:
    """`a.b.c` / `d` / `x.{y,z}` -> a.b.c, a.b.d, x.y, x.z: a bare name is the first's sibling."""
    out: list[str] = []
    for name in re.findall(r"`([^`]+)`", cell):
        if "." not in name and out:
            name = out[0].rsplit(".", 1)[0] + "." + name
        braces = re.fullmatch(r"(.*)\{(.+)\}", name)
        out += [braces[1] + alt for alt in braces[2].split(",")] if braces else [name]
    return out


def literal(text: str) -> Any:
    """The value a default cell names, or None for words (a default the schema cannot hold)."""
    text = text.strip()
    if code := re.fullmatch(r"`([^`]*)`", text):
        return code[1]
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return float(text)
    if sized := re.fullmatch(r"([0-9]+) ([KMG]iB)", text):
        return int(sized[1]) * UNITS[sized[2]]
    return None


def schema_key(path: str) -> dict[str, Any]:
    node = config.schema()
    for part in path.split("."):
        node = node["properties"][part]
    return node


def documented() -> list[tuple[str, str, Any]]:
    """(key, default cell, value or None) for each key the table documents."""
    out: list[tuple[str, str, Any]] = []
    for key_cell, default_cell, meaning in table():
        if key_cell.endswith(".*`"):  # `limits.*`: the values are in the meaning, `name` N
            prefix = key_cell.strip("`")[:-1]
            out += [(prefix + name, n, float(n))
                    for name, n in re.findall(r"`(\w+)` ([0-9]+)", meaning)]
            continue
        paths = keys(key_cell)
        cells = default_cell.split(" / ") if len(paths) > 1 else [default_cell]
        if len(cells) == 1:  # `aws.endpoints.{s3,sns,lambda}` | — : one default for each
            cells *= len(paths)
        assert len(cells) == len(paths), f"{key_cell}: {len(paths)} keys, defaults {default_cell!r}"
        out += [(path, cell, literal(cell)) for path, cell in zip(paths, cells, strict=True)]
    return out


def test_the_table_is_read() -> None:
    rows = documented()
    assert len(rows) > 40
    assert ("worker.retry_max_delay", "600", 600.0) in rows
    assert ("limits.actions_per_rule", "10", 10.0) in rows
    assert ("aws.endpoints.lambda", "—", None) in rows
    assert ("scan.virus.max_size", "25 MiB", 25 * 1024 ** 2) in rows


@pytest.mark.parametrize(("path", "cell", "value"),
                         [pytest.param(*row, id=row[0]) for row in documented()])
def test_each_default_in_the_readme_is_the_schemas(path: str, cell: str, value: Any) -> None:
    key = schema_key(path)
    if value is None:
        assert "default" not in key, f"README says {cell!r}; the schema: {key['default']!r}"
    else:
        assert "default" in key, f"README says {cell!r}; the schema has no default"
        same = key["default"] == value  # 2 == 2.0; True == 1.0 too, hence the type
        same = same and isinstance(key["default"], bool) == isinstance(value, bool)
        assert same, f"README says {cell!r}; the schema: {key['default']!r}"


def _with_defaults(node: dict[str, Any], prefix: str = "") -> set[str]:
    found: set[str] = set()
    for name, sub in node.get("properties", {}).items():
        path = prefix + name
        if "default" in sub:
            found.add(path)
        found |= _with_defaults(sub, path + ".")
    return found


def test_every_default_of_a_setting_has_a_row() -> None:
    missing = _with_defaults(config.schema()) - {path for path, _, _ in documented()}
    assert not missing
