"""Prometheus for the tests: promtool, the metrics catalogue as exposed, and a real server.

- `promtool()` finds Debian's promtool (package `prometheus`); skip locally, fail in CI.
- `exposition()` renders what each program serves on its metrics endpoint, from a
  fresh registry holding the program's own metric objects (and, for the worker, its
  spool collector), so the checks see exactly the names and HELP text scraped.
- `PrometheusServer` runs /usr/bin/prometheus on a loopback port with a throwaway
  TSDB, scraping given targets every second; `query()` asks its HTTP API.
- The `prometheus_factory` fixture starts servers and stops them at teardown.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from . import components
from .ports import free_port, wait_listening
from .process import ManagedProcess

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
ALERTS = CONF / "prometheus" / "mxrules-alerts.yml"
ALERT_TESTS = CONF / "prometheus" / "mxrules-alerts.test.yml"
SCRAPE_CONFIG = CONF / "prometheus" / "prometheus.yml"
DASHBOARD = CONF / "grafana" / "mxrules.json"

PROGRAMS = ("milter", "worker")


def promtool() -> str:
    """The promtool binary (Debian package `prometheus`)."""
    return components.require("promtool (Debian package prometheus)", "promtool")[0]


def prometheus_binary() -> str:
    return components.require("Prometheus (Debian package prometheus)", "prometheus")[0]


def run_promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """`promtool ARGS`; the caller asserts on returncode and shows stdout+stderr."""
    return subprocess.run([promtool(), *args], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=60, check=False)


# -- the catalogue as the programs expose it ----------------------------------

def exposition(program: str, spool_dir: Path) -> str:
    """The text the program's metrics endpoint serves right after start."""
    from mxrules.actions.worker import SpoolCollector
    from mxrules.metrics import MilterMetrics, WorkerMetrics
    from mxrules.spool import Spool

    registry = CollectorRegistry()
    if program == "milter":
        MilterMetrics(registry).loaded(at_start=True)
    elif program == "worker":
        spool = Spool(str(spool_dir))
        spool.ensure()
        WorkerMetrics(registry).loaded(at_start=True)
        registry.register(SpoolCollector(spool))
    else:
        raise ValueError(program)
    return generate_latest(registry).decode()


_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)
# The series names each metric type is queried by (the family name itself for a
# counter is its `_total` name in prometheus_client's text output).
_SERIES_SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def metric_types(text: str) -> dict[str, str]:
    """Family name -> type, from the `# TYPE` lines (present even before any sample)."""
    return {name: kind for name, kind in _TYPE.findall(text)
            if not name.endswith("_created")}


def queryable_names(text: str) -> set[str]:
    """Every series name a PromQL expression may use for the families in `text`.

    Derived from the types, not from the samples: a labelled histogram has no
    `_bucket` sample until its first observation, yet may rightly be queried.
    The `_created` series are left out: an alert or panel has no business with them.
    """
    out: set[str] = set()
    for name, kind in metric_types(text).items():
        out.update(name + suffix for suffix in _SERIES_SUFFIXES.get(kind, ("",)))
    return out


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MXRULES_NAME = re.compile(r"(?<![A-Za-z0-9_:])mxrules_[A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The mxrules_* metric names an expression uses (label values and strings ignored)."""
    return set(_MXRULES_NAME.findall(_STRING.sub('""', expr)))


def alert_expressions(path: Path = ALERTS) -> dict[str, str]:
    """Alert (or recording rule) name -> expression, from a rule file."""
    doc = yaml.safe_load(path.read_text())
    return {rule.get("alert") or rule["record"]: rule["expr"]
            for group in doc["groups"] for rule in group["rules"]}


def dashboard_expressions(path: Path = DASHBOARD) -> dict[str, str]:
    """Where -> PromQL, for every panel target and templating query of the dashboard."""
    doc = json.loads(path.read_text())
    out: dict[str, str] = {}

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                out[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
            walk(panel.get("panels", []))

    walk(doc["panels"])
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            out[f"variable {var['name']}"] = query if isinstance(query, str) else query["query"]
    return out


# Grafana's variables, as a concrete query would have them.
_GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
                 "${datasource}": "", "$milter": ".*", "$worker": ".*"}


def concrete(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in."""
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


# -- a real Prometheus server -------------------------------------------------

class PrometheusServer(ManagedProcess):
    """Prometheus on 127.0.0.1, scraping `targets` (job name -> host:port) every second."""

    name = "prometheus"

    def __init__(self, workdir: Path, targets: Mapping[str, str],
                 rule_files: Iterable[Path] = ()) -> None:
        self.workdir = workdir
        self.targets = dict(targets)
        self.rule_files = [str(p) for p in rule_files]
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        super().__init__(workdir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        doc = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in self.targets.items()],
        }
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def start(self, timeout: float = 30) -> None:
        binary = prometheus_binary()
        self.write_config()
        self.spawn([binary, f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                   cwd=self.workdir)
        try:
            wait_listening("127.0.0.1", self.port, timeout, connect=False)
            self.wait_ready(self._ready, timeout, interval=0.1)
        except (TimeoutError, RuntimeError):
            self.stop()
            raise RuntimeError(f"prometheus did not become ready:\n{self.log()}") from None

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except urllib.error.URLError:
            return False

    def stop(self) -> None:
        self.terminate(15)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; returns `data`, raises on an error status."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{url}: {exc.code} {exc.read().decode(errors='replace')}"
                                 ) from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the result vector (each item has `metric` and `value`)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [
            {"metric": {}, "value": data["result"]}]
        return result

    def values(self, expr: str, by: str) -> dict[str, float]:
        """An instant query's values keyed by one label."""
        return {item["metric"].get(by, ""): float(item["value"][1])
                for item in self.query(expr)}

    def wait_for(self, expr: str, ok: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 20) -> list[dict[str, Any]]:
        """Query until `ok(result)` holds (scrapes come every second)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if ok(result):
                return result
            if time.monotonic() > deadline:
                targets = self.api("targets")["activeTargets"]
                health = [(t["labels"]["job"], t["health"], t["lastError"]) for t in targets]
                raise TimeoutError(f"{expr}: last result {result}; targets {health}\n"
                                   f"{self.log()[-2000:]}")
            time.sleep(0.2)


PrometheusFactory = Callable[..., PrometheusServer]


@pytest.fixture
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[PrometheusFactory]:
    """Start real Prometheus servers (skip locally, fail in CI without the binary)."""
    prometheus_binary()
    servers: list[PrometheusServer] = []

    def make(targets: Mapping[str, str], rule_files: Iterable[Path] = ()) -> PrometheusServer:
        server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), targets, rule_files)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()
