"""Settings read by their schema key: the value given, else the schema's default."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest

from mxrules import config
from mxrules.configschema import default, value
from mxrules.rules import Limits
from mxrules.settings import AwsSettings, ScanSettings, WorkerSettings


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        pytest.param({"worker": {"threads": 9}}, "worker.threads", 9, id="given"),
        pytest.param({}, "worker.threads", 4, id="absent-is-the-default"),
        pytest.param({"worker": {}}, "worker.threads", 4, id="section-without-the-key"),
        pytest.param({"bounce": {"rate_limit": {"period": 60}}}, "bounce.rate_limit.period",
                     60.0, id="nested-given"),
        pytest.param({"bounce": {}}, "bounce.rate_limit.period", 3600.0, id="nested-absent"),
        pytest.param({"aws": {}}, "aws.region", None, id="no-default-is-none"),
        pytest.param({"aws": {"region": "eu-west-1"}}, "aws.region", "eu-west-1",
                     id="no-default-given"),
    ],
)
def test_value_is_the_config_s_or_the_schema_s(data: dict[str, Any], path: str,
                                                expected: Any) -> None:
    got = value(data, path)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        pytest.param("milter.reload_interval", float, id="number-is-float"),
        pytest.param("worker.retry_window", float, id="number-written-as-integer"),
        pytest.param("milter.timeout", int, id="integer"),
        pytest.param("bounce.reject_at_rcpt", bool, id="boolean"),
        pytest.param("$defs.rule.tls_policy", str, id="in-defs"),
    ],
)
def test_default_has_the_schema_s_type(path: str, kind: type) -> None:
    assert type(default(path)) is kind


def test_a_key_without_default_is_an_error() -> None:
    with pytest.raises(KeyError):
        default("aws.region")


def _schema_defaults(node: dict[str, Any], prefix: str = "") -> set[str]:
    found: set[str] = set()
    for name, sub in node.get("properties", {}).items():
        if "default" in sub:
            found.add(prefix + name)
        found |= _schema_defaults(sub, prefix + name + ".")
    return found


def test_every_default_of_a_setting_is_read_by_a_field() -> None:
    """A default in the schema that no field reads would be a setting the programs ignore."""
    read = {f.metadata["key"] for cls in (config.Config, WorkerSettings, AwsSettings, ScanSettings)
            for f in fields(cls) if "key" in f.metadata}
    read |= {f"limits.{f.name}" for f in fields(Limits)}
    read |= {"scan.spam.max_size", "scan.virus.max_size"}  # in ScannerSettings, when configured
    assert _schema_defaults(config.schema()) <= read
    assert "worker.threads" in read
