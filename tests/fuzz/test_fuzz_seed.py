"""The fuzz targets' seed run: every target, a few hundred inputs, in the test suite.

The long run (100,000+ inputs) is `bench/fuzz.py`; this one keeps the
targets working and catches regressions on the inputs hypothesis finds first.
MXRULES_HYPOTHESIS=fuzz runs the same tests with many more inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from fuzz.targets import TARGETS, Target, cleanup, prepare, run_one
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry

from harness.dns import shared_server
from mxrules.config import load
from mxrules.decision import CONTINUE, Engine
from mxrules.errors import ConfigError, CorruptJobError
from mxrules.metrics import MilterMetrics
from mxrules.milter.session import Runtime, Session
from mxrules.spool import Spool

# Hostile inputs are big and slow to generate on purpose: no health check applies.
settings.register_profile(
    "mxrules-fuzz-seed-ci", max_examples=100, deadline=None, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck))
settings.register_profile(
    "mxrules-fuzz-seed-fuzz", max_examples=5000, deadline=None, database=None,
    print_blob=True, suppress_health_check=list(HealthCheck))
PROFILE = settings.get_profile(
    "mxrules-fuzz-seed-" + os.environ.get("MXRULES_HYPOTHESIS", "ci"))


@pytest.fixture(scope="module", autouse=True)
def _scratch() -> Iterator[None]:
    prepare()
    yield
    cleanup()


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_target_survives_its_seed_inputs(target: Target) -> None:
    @PROFILE
    @given(value=target.strategy)
    def run(value: Any) -> None:
        run_one(target, value)

    run()


# -- inputs the fuzz run found, kept as regression tests ----------------------------


@pytest.mark.parametrize("text", ["[" * 5000, "{" * 5000, "a:\n" + "".join(
    " " * (i + 1) + "- \n" for i in range(1500))], ids=["list", "map", "indent"])
def test_deeply_nested_yaml_is_a_config_error(tmp_path, text: str) -> None:
    path = str(tmp_path / "mxrules.yaml")
    with pytest.raises(ConfigError) as caught:
        load(path, text=text)
    assert [(p.file, p.message) for p in caught.value.problems] == [
        (path, "not valid YAML: nested too deeply")]


def test_deeply_nested_ses_export_is_a_config_error(tmp_path) -> None:
    (tmp_path / "rule-set.json").write_text("[" * 5000)
    (tmp_path / "mxrules.yaml").write_text("rule_set_file: rule-set.json\n")
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path / "mxrules.yaml"))
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / 'rule-set.json'}: not valid JSON: nested too deeply"]


def test_deeply_nested_job_json_is_moved_to_corrupt(tmp_path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.ensure()
    job_id = "0123456789abcdefghijklmnopqrstuv01234567"
    os.mkdir(spool.path("incoming", job_id))
    with open(os.path.join(spool.path("incoming", job_id), "job.json"), "wb") as fh:
        fh.write(b"[" * 100_000)
    with pytest.raises(CorruptJobError):
        spool.claim("incoming", job_id)
    assert spool.find(job_id) == "corrupt"


def test_bytes_that_are_not_utf8_in_the_envelope_still_give_a_job(tmp_path) -> None:
    """pymilter hands undecodable bytes over as lone surrogates; the job must still encode."""
    config = tmp_path / "mxrules.yaml"
    # Every message is authenticated: SPF/DKIM/DMARC see the same bytes, on a local DNS server.
    config.write_text("hostname: mx.example.com\ndomains: [example.com]\n"
                      "rule_sets:\n  default:\n    - {name: all, enabled: true}\n"
                      f"scan: {{dns: {{nameservers: ['{shared_server().address}']}}}}\n")
    rt = Runtime(Engine(load(str(config))), Spool(str(tmp_path / "spool")),
                 MilterMetrics(CollectorRegistry()))
    session = Session(rt, "c1")
    assert session.connect("203.0.113.5", "host\udcff.test") == CONTINUE
    session.helo("helo\udce9", "", "")
    assert session.mail("<s\udce9@sender.test>", {}) == CONTINUE
    assert session.rcpt("<u\udcff@example.com>", tls=False) == CONTINUE
    session.header("Subject", b"caf\xe9")
    session.eoh()
    session.body(b"body\r\n")
    result = session.eom("Q\udcff")
    assert result.reply == CONTINUE
    job = rt.spool.load("incoming", result.message_id)
    assert (job.mail_from, job.recipients, job.queue_id) == (
        "s\ufffd@sender.test", ("u\ufffd@example.com",), "Q\ufffd")
    assert (job.client.hostname, job.client.helo) == ("host\ufffd.test", "helo\ufffd")
    assert [n for n, _ in job.auth_headers] == ["Received-SPF", "Authentication-Results"]
    with open(rt.spool.message_path("incoming", result.message_id), "rb") as fh:
        assert fh.read() == b"Subject:caf\xe9\r\n\r\nbody\r\n"  # the message itself: as sent
    assert os.listdir(os.path.join(rt.spool.root, "tmp")) == []
