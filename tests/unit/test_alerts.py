"""conf/prometheus and conf/grafana: valid for the tools, and only about metrics that exist.

promtool checks the rule file, runs its unit tests (mxrules-alerts.test.yml fires
every alert on synthetic series, and keeps each quiet where it must be), and
checks the example scrape config.  Every mxrules_* name in an alert or in the
dashboard's PromQL must be one the programs expose, with the suffix its type
allows (`_bucket` only on a histogram); the dashboard's expressions must parse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness.prometheus import (
    ALERT_TESTS,
    ALERTS,
    DASHBOARD,
    PROGRAMS,
    SCRAPE_CONFIG,
    alert_expressions,
    concrete,
    dashboard_expressions,
    exposition,
    promql_metric_names,
    queryable_names,
    run_promtool,
)
from mxrules.config import Config, WorkerSettings

ALERT_NAMES = {"MxrulesMilterDown", "MxrulesWorkerDown", "MxrulesTempfailRate",
               "MxrulesSpoolBacklog", "MxrulesDeadLetters", "MxrulesActionErrors",
               "MxrulesConfigReloadFailing", "MxrulesDeadLetterRetention"}


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    spool = tmp_path_factory.mktemp("catalogue") / "spool"
    return set().union(*(queryable_names(exposition(p, spool)) for p in PROGRAMS))


def test_name_extraction_sees_through_strings_and_keeps_suffixes() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(mxrules_scan_duration_seconds_bucket'
            '{job="mxrules_not_a_metric"}[5m]))) / mxrules_x:ratio')
    assert promql_metric_names(expr) == {"mxrules_scan_duration_seconds_bucket",
                                         "mxrules_x:ratio"}
    text = ("# HELP mxrules_a_seconds A b c d.\n# TYPE mxrules_a_seconds histogram\n"
            "# HELP mxrules_b_total A b c d.\n# TYPE mxrules_b_total counter\n")
    assert queryable_names(text) == {"mxrules_a_seconds_bucket", "mxrules_a_seconds_sum",
                                     "mxrules_a_seconds_count", "mxrules_b_total"}


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout


def test_promtool_test_rules_fires_each_alert() -> None:
    result = run_promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    fired = {case["alertname"] for test in doc["tests"] for case in test["alert_rule_test"]
             if case["exp_alerts"]}
    assert fired == ALERT_NAMES == set(alert_expressions())


def test_example_scrape_config_matches_the_programs_defaults() -> None:
    result = run_promtool("check", "config", str(SCRAPE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    doc = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in doc["scrape_configs"]}
    assert jobs == {"mxrules-milter": [Config(path="").metrics_listen],
                    "mxrules-worker": [WorkerSettings().metrics_listen]}
    # The alerts find the programs by these job names.
    exprs = alert_expressions()
    assert 'job="mxrules-milter"' in exprs["MxrulesMilterDown"]
    assert 'job="mxrules-worker"' in exprs["MxrulesWorkerDown"]


def test_every_metric_in_the_alerts_is_exposed(exposed: set[str]) -> None:
    for alert, expr in alert_expressions().items():
        names = promql_metric_names(expr)
        assert names <= exposed, (alert, names - exposed)
    used = set().union(*(promql_metric_names(e) for e in alert_expressions().values()))
    assert {"mxrules_spool_oldest_job_age_seconds", "mxrules_dead_letters_total",
            "mxrules_actions_total", "mxrules_messages_total",
            "mxrules_config_last_reload_successful", "mxrules_dead_letter_oldest_age_seconds",
            "mxrules_dead_letter_retention_age_seconds", "mxrules_dead_letter_bytes",
            "mxrules_dead_letter_retention_bytes"} <= used


def test_every_metric_in_the_dashboard_is_exposed(exposed: set[str]) -> None:
    exprs = dashboard_expressions()
    for where, expr in exprs.items():
        names = promql_metric_names(expr)
        assert names <= exposed, (where, names - exposed)
    used = set().union(*(promql_metric_names(e) for e in exprs.values()))
    # Mail flow, rejections, verdicts, action latency and errors, spool backlog,
    # dead letters, reloads.
    assert {"mxrules_connections_total", "mxrules_messages_total", "mxrules_recipients_total",
            "mxrules_rejections_total", "mxrules_verdicts_total",
            "mxrules_action_duration_seconds_bucket", "mxrules_action_errors_total",
            "mxrules_actions_total", "mxrules_spool_jobs", "mxrules_spool_oldest_job_age_seconds",
            "mxrules_dead_letters_total", "mxrules_config_reloads_total"} <= used


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses each panel's PromQL, Grafana's variables filled in, as a recording rule."""
    exprs = dashboard_expressions()
    rules = [{"record": f"mxrules_dashboard:expr_{i}", "expr": concrete(e)}
             for i, e in enumerate(exprs.values()) if not e.startswith("label_values(")]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(rules) >= 20


def test_dashboard_is_importable_grafana_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "mxrules" and doc["title"]
    [ds] = [v for v in doc["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    uid = "${" + ds["name"] + "}"
    ids = []
    panels = doc["panels"]
    for panel in panels:
        ids.append(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"], panel["title"]
    assert len(ids) == len(set(ids))
    # No two panels overlap on the grid.
    cells = set()
    for panel in panels:
        p = panel["gridPos"]
        for x in range(p["x"], p["x"] + p["w"]):
            for y in range(p["y"], p["y"] + p["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))
