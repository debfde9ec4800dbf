"""The metrics catalogue as the two programs expose it (README, "Monitoring").

Each program's endpoint text is rendered from a fresh registry with its own
metric objects and checked by `promtool check metrics` (Debian's promtool), then
against the project's rules: `mxrules_<noun>_<unit|total>` names, bounded label
names, HELP a person can read, histogram buckets from milliseconds to minutes,
and the known label values present at zero from the start.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from harness.prometheus import PROGRAMS, exposition, metric_types, run_promtool
from mxrules import config as config_mod
from mxrules.actions.worker import Worker
from mxrules.metrics import ACTION_OUTCOMES, ACTION_TYPES, MilterMetrics, WorkerMetrics
from mxrules.spool import STATES

# Label names whose values come from a closed set or from the operator's own config
# (rule names); anything else (an address, a message id) would grow without bound.
BOUNDED_LABELS = {"result", "stage", "reason", "rule", "scanner", "status", "type", "outcome",
                  "disposition", "state"}


def texts(tmp_path: Path) -> dict[str, str]:
    return {p: exposition(p, tmp_path / "spool") for p in PROGRAMS}


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def busy_exposition(program: str) -> bytes:
    """The program's metrics with a sample in every labelled family, as after some mail."""
    registry = CollectorRegistry()
    metrics = MilterMetrics(registry) if program == "milter" else WorkerMetrics(registry)
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            child = value.labels(*("x" for _ in value._labelnames))
            if isinstance(child, Histogram):
                child.observe(0.3)
            elif isinstance(child, Counter):
                child.inc()
    return generate_latest(registry)


@pytest.mark.parametrize("program", PROGRAMS)
def test_promtool_accepts_each_programs_metrics(tmp_path: Path, program: str) -> None:
    for text in (exposition(program, tmp_path / "spool").encode(), busy_exposition(program)):
        result = run_promtool("check", "metrics", stdin=text)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "", result.stdout


def test_names_follow_the_convention_and_help_reads_as_a_sentence(tmp_path: Path) -> None:
    for program, text in texts(tmp_path).items():
        for name, kind in metric_types(text).items():
            assert re.fullmatch(r"mxrules_[a-z][a-z0-9_]*[a-z]", name), name
            if kind == "counter":
                assert name.endswith("_total"), name
            else:
                assert not name.endswith("_total"), name
            if kind == "histogram":
                assert name.endswith(("_seconds", "_bytes")), name
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):
                continue
            words = family.documentation.split()
            assert len(words) >= 4 and not words[0][0].islower(), (program, family.name)
            assert family.documentation.endswith((".", ")")), (program, family.name)


def test_label_names_are_bounded(tmp_path: Path) -> None:
    for program in PROGRAMS:
        registry = CollectorRegistry()
        metrics = MilterMetrics(registry) if program == "milter" else WorkerMetrics(registry)
        for value in vars(metrics).values():
            if isinstance(value, MetricWrapperBase):
                assert set(value._labelnames) <= BOUNDED_LABELS, (program, value._name)
    worker = families(texts(tmp_path)["worker"])
    for name in ("mxrules_spool_jobs", "mxrules_spool_oldest_job_age_seconds"):
        assert {tuple(s.labels) for s in worker[name].samples} == {("state",)}


def test_catalogue_has_everything_the_design_asks_for(tmp_path: Path) -> None:
    t = texts(tmp_path)
    milter, worker = metric_types(t["milter"]), metric_types(t["worker"])
    assert {
        "mxrules_connections_total": "counter", "mxrules_recipients_total": "counter",
        "mxrules_messages_total": "counter", "mxrules_rejections_total": "counter",
        "mxrules_rule_matches_total": "counter", "mxrules_verdicts_total": "counter",
        "mxrules_scan_duration_seconds": "histogram", "mxrules_received_chunks_total": "counter",
        "mxrules_forwarded_unresolved_total": "counter",
        "mxrules_config_reloads_total": "counter",
        "mxrules_config_last_reload_success_timestamp_seconds": "gauge",
        "mxrules_config_last_reload_successful": "gauge",
    }.items() <= milter.items()
    assert {
        "mxrules_actions_total": "counter", "mxrules_action_errors_total": "counter",
        "mxrules_action_duration_seconds": "histogram", "mxrules_dead_letters_total": "counter",
        "mxrules_spool_jobs": "gauge", "mxrules_spool_oldest_job_age_seconds": "gauge",
        "mxrules_dead_letters_removed_total": "counter", "mxrules_dead_letter_bytes": "gauge",
        "mxrules_dead_letter_oldest_age_seconds": "gauge",
        "mxrules_dead_letter_retention_age_seconds": "gauge",
        "mxrules_dead_letter_retention_bytes": "gauge",
        "mxrules_config_reloads_total": "counter",
        "mxrules_config_last_reload_success_timestamp_seconds": "gauge",
        "mxrules_config_last_reload_successful": "gauge",
    }.items() <= worker.items()


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def test_known_label_values_exist_at_zero_from_the_start(tmp_path: Path) -> None:
    """A series born at 1 looks flat to rate(): alerts would miss the first event."""
    t = texts(tmp_path)
    assert _samples(t["milter"], "mxrules_messages_total") == {
        (("result", r),): 0.0 for r in ("spooled", "passed", "tempfail", "rejected")}
    assert _samples(t["milter"], "mxrules_connections_total") == {
        (("result", "accepted"),): 0.0, (("result", "rejected"),): 0.0}
    assert _samples(t["milter"], "mxrules_post_commit_errors_total") == {
        (("stage", s),): 0.0
        for s in ("add-header", "remove-header", "remove-recipient", "bookkeeping")}
    assert _samples(t["milter"], "mxrules_forwarded_unresolved_total") == {
        (("reason", r),): 0.0 for r in ("no-received", "unparsable-received",
                                        "ambiguous-received", "too-many-hops",
                                        "only-trusted-hops")}
    actions = _samples(t["worker"], "mxrules_actions_total")
    assert actions == {(("outcome", o), ("type", k)): 0.0
                       for k in ACTION_TYPES for o in ACTION_OUTCOMES}
    assert _samples(t["worker"], "mxrules_dead_letters_total") == {(): 0.0}
    assert _samples(t["worker"], "mxrules_dead_letters_removed_total") == {
        (("reason", "age"),): 0.0, (("reason", "size"),): 0.0}
    assert _samples(t["milter"], "mxrules_recipients_total")[(("result", "too-big"),)] == 0.0
    assert set(_samples(t["worker"], "mxrules_spool_jobs")) == {(("state", s),) for s in STATES}
    for program in PROGRAMS:
        assert _samples(t[program], "mxrules_config_reloads_total") == {
            (("result", "failed"),): 0.0, (("result", "ok"),): 0.0}
        assert _samples(t[program], "mxrules_config_last_reload_successful") == {(): 1.0}
        [stamp] = _samples(t[program],
                           "mxrules_config_last_reload_success_timestamp_seconds").values()
        assert stamp > 1.7e9


@pytest.mark.parametrize("name, smallest, largest", [
    ("mxrules_spool_commit_seconds", 0.001, 1),
    ("mxrules_scan_duration_seconds", 0.01, 60),
    ("mxrules_action_duration_seconds", 0.01, 300),
    ("mxrules_job_latency_seconds", 0.1, 4 * 3600),
])
def test_duration_buckets_span_milliseconds_to_minutes(name: str, smallest: float,
                                                       largest: float) -> None:
    text = b"".join(busy_exposition(p) for p in PROGRAMS).decode()
    bounds = sorted({float(s.labels["le"]) for f in text_string_to_metric_families(text)
                     if f.name == name for s in f.samples if "le" in s.labels})
    finite = [b for b in bounds if b != float("inf")]
    assert finite and finite[0] <= smallest and finite[-1] >= largest, (name, finite)


def _worker_config(path: Path, retry_window: int = 600) -> None:
    path.write_text(yaml.safe_dump({
        "spool": {"directory": str(path.parent / "spool")},
        "metrics": {"worker_listen": ""},
        "worker": {"retry_window": retry_window},
    }))


def test_worker_counts_its_config_reloads(tmp_path: Path) -> None:
    path = tmp_path / "mxrules.yaml"
    _worker_config(path)
    registry = CollectorRegistry()
    worker = Worker(config_mod.load(str(path)), registry)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("mxrules_config_last_reload_successful") == 1
    path.write_text("worker: [unclosed\n")
    assert worker.reload(str(path)) is False
    assert value("mxrules_config_reloads_total", result="failed") == 1
    assert value("mxrules_config_last_reload_successful") == 0
    _worker_config(path, retry_window=1200)
    assert worker.reload(str(path)) is True
    assert value("mxrules_config_reloads_total", result="ok") == 1
    assert value("mxrules_config_last_reload_successful") == 1
