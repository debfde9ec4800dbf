"""The programs' settings: each field names its YAML key, and its default is the schema's.

As Postfix's mail_params.h gives each parameter one name and one default, a
setting here is `setting("worker.threads")`: the key it is read from, with the
default written once, in mxrules.schema.json (where mxrules.yaml(5) and the
README's table are checked against it).  `read` builds a section from the YAML
with the same declarations, so a new setting is a schema entry and a field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from .configschema import default, value

T = TypeVar("T")


def setting(key: str) -> Any:
    """A field read from the YAML's dotted `key`, its default the schema's."""
    return field(default=default(key), metadata={"key": key})


def optional(key: str) -> Any:
    """A field read from the YAML's dotted `key`, with no default: None when absent."""
    return field(default=None, metadata={"key": key})


def read(cls: type[T], data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `cls` that name a key, from `data` or the schema's defaults."""
    return {f.name: value(data, f.metadata["key"])
            for f in fields(cls)  # type: ignore[arg-type]
            if "key" in f.metadata}


@dataclass(frozen=True)
class WorkerSettings:
    """What `mxrules worker` and its actions need beyond the rules."""

    threads: int = setting("worker.threads")
    scan_interval: float = setting("worker.scan_interval")
    retry_window: float = setting("worker.retry_window")
    retry_initial_delay: float = setting("worker.retry_initial_delay")
    retry_max_delay: float = setting("worker.retry_max_delay")
    drain_timeout: float = setting("worker.drain_timeout")
    metrics_listen: str = setting("metrics.worker_listen")
    bounce_relay: str = setting("bounce.smtp_relay")
    smtp_timeout: float = setting("bounce.timeout")
    # A DSN goes only to a sender SPF or aligned DMARC vouches for (no backscatter).
    bounce_require_authenticated: bool = setting("bounce.require_authenticated_sender")
    # DSNs per sender and per client IP (IPv6: per /64) in each period of seconds.
    bounce_rate_per_sender: int = setting("bounce.rate_limit.per_sender")
    bounce_rate_per_client: int = setting("bounce.rate_limit.per_client_ip")
    bounce_rate_period: float = setting("bounce.rate_limit.period")
    # Dead letters' retention (0: no limit).
    failed_max_age: float = setting("spool.failed_max_age")
    failed_max_size: int = setting("spool.failed_max_size")


@dataclass(frozen=True)
class AwsSettings:
    region: str | None = optional("aws.region")
    endpoint_url: str | None = optional("aws.endpoint_url")
    endpoints: Mapping[str, str] = field(default_factory=dict)
    connect_timeout: float = setting("aws.connect_timeout")
    read_timeout: float = setting("aws.read_timeout")


@dataclass(frozen=True)
class ScannerSettings:
    engine: str
    address: str
    max_size: int


@dataclass(frozen=True)
class ScanSettings:
    spam: ScannerSettings | None = None
    virus: ScannerSettings | None = None
    nameservers: tuple[str, ...] = ()
    dns_timeout: float = setting("scan.dns.timeout")
    timeout: float = setting("scan.timeout")
    on_failure: str = setting("scan.on_failure")
    dkim_max_size: int = setting("scan.dkim_max_size")
    concurrency: int = setting("scan.concurrency")
    wait_timeout: float = setting("scan.wait_timeout")
    # always: SPF/DKIM/DMARC on every handled message, as SES; scan_enabled: only
    # when a matched rule scans; never.  See the schema's description.
    authentication: str = setting("scan.authentication")


# -- one function per section ------------------------------------------------

def worker_settings(data: Mapping[str, Any]) -> WorkerSettings:
    return WorkerSettings(**read(WorkerSettings, data))


def aws_settings(data: Mapping[str, Any]) -> AwsSettings:
    return AwsSettings(**read(AwsSettings, data),
                       endpoints=dict(data.get("aws", {}).get("endpoints", {})))


def _scanner(data: Mapping[str, Any], kind: str) -> ScannerSettings | None:
    if not data.get("scan", {}).get(kind):
        return None
    return ScannerSettings(value(data, f"scan.{kind}.engine"), value(data, f"scan.{kind}.address"),
                           value(data, f"scan.{kind}.max_size"))


def scan_settings(data: Mapping[str, Any]) -> ScanSettings:
    return ScanSettings(**read(ScanSettings, data),
                        spam=_scanner(data, "spam"), virus=_scanner(data, "virus"),
                        nameservers=tuple(value(data, "scan.dns.nameservers") or ()))
