"""A whole receiving stack for integration tests: real Postfix + mxrules milter + sink.

The rules are written either as mxrules YAML or as SES's own JSON exports
(`rule_set_file:` / `ip_filter_file:`), so the same tests prove both inputs
behave the same.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mxrules.spool import Job, Spool

from .dns import shared_server
from .mxrules_proc import MilterProcess
from .postfix import Postfix
from .sink import SmtpSink
from .smtp import Result, send

# The receipt rules every integration test runs against (YAML form).
RULES: list[dict[str, Any]] = [
    {"name": "store", "enabled": True,
     "recipients": ["user@example.com", ".sub.example.com"],
     "actions": [{"add_header": {"header_name": "X-First", "header_value": "one"}},
                 {"s3": {"bucket_name": "mail-bucket", "object_key_prefix": "in/"}}]},
    {"name": "second", "enabled": True,
     "recipients": ["user@example.com", "other@example.com"],
     "actions": [{"add_header": {"header_name": "X-Second", "header_value": "two"}}]},
    {"name": "secure", "enabled": True, "tls_policy": "Require",
     "recipients": ["tls.example.com"],
     "actions": [{"add_header": {"header_name": "X-Secure", "header_value": "yes"}}]},
    {"name": "switched-off", "enabled": False, "recipients": ["off@example.com"]},
]
FILTERS: list[dict[str, str]] = [
    {"name": "bad-net", "policy": "Block", "cidr": "192.0.2.0/24"},
    {"name": "good-host", "policy": "Allow", "cidr": "192.0.2.7"},
    {"name": "bad-v6", "policy": "Block", "cidr": "2001:db8:bad::/48"},
]
BLOCKLIST = "# local blocklist\n198.51.100.0/24\n"
DOMAINS = ["example.com", ".sub.example.com", "tls.example.com"]


def _camel(snake: str) -> str:
    return "".join(p.capitalize() for p in snake.split("_"))


def ses_rule_set(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    """The same rules as `aws ses describe-active-receipt-rule-set` prints them."""
    ses_names = {"add_header": "AddHeaderAction", "s3": "S3Action", "sns": "SNSAction",
                 "lambda": "LambdaAction", "bounce": "BounceAction", "stop": "StopAction"}
    out = []
    for rule in rules:
        r: dict[str, Any] = {_camel(k): v for k, v in rule.items() if k != "actions"}
        r["Actions"] = [{ses_names.get(k, _camel(k) + "Action"):
                         {_camel(f): v for f, v in body.items()}}
                        for a in rule.get("actions", []) for k, body in a.items()]
        out.append(r)
    return {"Metadata": {"Name": name, "CreatedTimestamp": "2026-01-01T00:00:00.000Z"},
            "Rules": out}


def ses_filters(filters: list[dict[str, str]]) -> dict[str, Any]:
    return {"Filters": [{"Name": f["name"], "IpFilter": {"Policy": f["policy"],
                                                         "Cidr": f["cidr"]}}
                        for f in filters]}


def write_config(directory: Path, *, source: str = "yaml", rules: list[dict[str, Any]] = RULES,
                 filters: list[dict[str, str]] = FILTERS, port: int = 9900,
                 **extra: Any) -> Path:
    """Write mxrules.yaml (and, for `ses`, the two SES export files) into `directory`."""
    (directory / "blocklist.txt").write_text(BLOCKLIST)
    doc: dict[str, Any] = {
        "hostname": "mx.test",
        "spool": {"directory": str(directory / "spool")},
        "metrics": {"milter_listen": ""},
        "milter": {"listen": f"inet:{port}@127.0.0.1", "reload_interval": 0.2},
        "domains": DOMAINS,
        "blocklists": ["blocklist.txt"],
        "delivery": "consume",
    }
    if source == "yaml":
        doc.update(active_rule_set="default", rule_sets={"default": rules}, ip_filters=filters)
    else:
        (directory / "rule-set.json").write_text(json.dumps(ses_rule_set("default", rules)))
        (directory / "filters.json").write_text(json.dumps(ses_filters(filters)))
        doc.update(rule_set_file="rule-set.json", ip_filter_file="filters.json")
    doc.update(extra)
    _local_dns(doc)
    path = directory / "mxrules.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)  # atomic: the milter's watcher never reads half a file
    return path


def _local_dns(doc: dict[str, Any]) -> None:
    """SPF, DKIM and DMARC run on every message: their DNS is local unless a test says."""
    scan = dict(doc.get("scan") or {})
    dns = dict(scan.get("dns") or {})
    if not dns.get("nameservers"):
        dns["nameservers"] = [shared_server().address]
        doc["scan"] = {**scan, "dns": dns}


@dataclass
class Stack:
    dir: Path
    milter: MilterProcess
    postfix: Postfix
    sink: SmtpSink
    source: str
    spool: Spool = field(init=False)

    def __post_init__(self) -> None:
        self.spool = Spool(str(self.dir / "spool"))

    def send(self, rcpts: list[str], msg: bytes | None = None, *, sender: str = "a@sender.test",
             client_ip: str | None = None, tls: bool = False) -> Result:
        if msg is None:
            msg = message(sender, rcpts)
        return send("127.0.0.1", self.postfix.smtp_port, sender, rcpts, msg,
                    client_ip=client_ip, tls=tls)

    def jobs(self) -> list[tuple[str, Job]]:
        out = []
        for job_id, job in self.spool.jobs("incoming"):
            assert isinstance(job, Job), job
            out.append((job_id, job))
        return out

    def rewrite_config(self, **kw: Any) -> Path:
        return write_config(self.dir, source=self.source, port=self.milter.port, **kw)


def message(sender: str, rcpts: list[str], subject: str = "test", body: str = "Hello.\r\n"
            ) -> bytes:
    to = ", ".join(f"<{r}>" for r in rcpts)
    head = (f"From: <{sender}>\r\nTo: {to}\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@sender.test>\r\n"
            "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n")
    return (head + "\r\n" + body).encode()
