"""The action registry (mxrules.actionspec) against everything that lists action types.

The schema stays hand-written JSON (its descriptions and patterns are for
people), so these tests hold it to the registry: a new action added to one and
not the other fails here, not in production.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest

from mxrules import actionspec, metrics
from mxrules.actions import runner
from mxrules.actionspec import SPECS, UnknownAction, narrow, spec_for
from mxrules.configschema import schema
from mxrules.rules import (
    Action,
    AddHeaderAction,
    BounceAction,
    LambdaAction,
    S3Action,
    SNSAction,
    StopAction,
)


def _schema_actions() -> dict[str, Any]:
    props: dict[str, Any] = schema()["$defs"]["action"]["properties"]
    return props


def test_schema_lists_exactly_the_registered_actions_in_order() -> None:
    assert list(_schema_actions()) == list(SPECS)
    described = schema()["$defs"]["action"]["description"]
    assert described == "exactly one of " + ", ".join(SPECS)


@pytest.mark.parametrize("key", list(SPECS))
def test_schema_fields_are_the_dataclass_fields(key: str) -> None:
    # topic_arn is the base class's (every SES action may notify); the schema
    # allows it where mxrules supports it, so it is left out of the comparison.
    fields = {f.name for f in dataclasses.fields(SPECS[key].cls)} - {"topic_arn"}
    in_schema = set(_schema_actions()[key].get("properties", {})) - {"topic_arn"}
    assert in_schema == fields


def test_metrics_label_every_registered_type() -> None:
    assert tuple(spec.cls.TYPE for spec in SPECS.values()) == metrics.ACTION_TYPES


def test_the_worker_runs_every_registered_type() -> None:
    assert set(runner.ACTIONS) == set(SPECS)
    assert all(callable(run) for run in runner.ACTIONS.values())


def test_the_core_does_not_import_the_worker_half() -> None:
    code = ("import sys, mxrules.actionspec, mxrules.payload, mxrules.explain, "
            "mxrules.decision, mxrules.jobstate; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['mxrules', 'actions']"
            " or m.split('.')[0] == 'actions'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


class _Unregistered(Action):
    KEY = "unregistered"
    TYPE = "Unregistered"


@pytest.mark.parametrize(("action", "cls"), [
    pytest.param(S3Action(bucket_name="b"), SNSAction, id="s3-as-sns"),
    pytest.param(StopAction(), BounceAction, id="stop-as-bounce"),
    pytest.param(AddHeaderAction(), LambdaAction, id="add-header-as-lambda"),
])
def test_narrow_refuses_another_type(action: Action, cls: type[Action]) -> None:
    with pytest.raises(UnknownAction, match=cls.__name__):
        narrow(action, cls)


def test_narrow_keeps_the_right_type() -> None:
    action = LambdaAction(function_arn="arn:aws:lambda:us-east-1:1:function:f")
    assert narrow(action, LambdaAction) is action


def test_an_unregistered_type_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(UnknownAction, match="_Unregistered"):
        spec_for(_Unregistered())
    with pytest.raises(UnknownAction):
        actionspec.describe(_Unregistered())


@pytest.mark.parametrize(("action", "header", "may_stop"), [
    pytest.param(AddHeaderAction(header_name="X-A", header_value="1"), ("X-A", "1"), False,
                 id="add-header"),
    pytest.param(StopAction(), None, True, id="stop"),
    pytest.param(LambdaAction(invocation_type="RequestResponse"), None, True,
                 id="lambda-request-response"),
    pytest.param(LambdaAction(invocation_type="Event"), None, False, id="lambda-event"),
    pytest.param(S3Action(bucket_name="b"), None, False, id="s3"),
])
def test_in_stream_role(action: Action, header: tuple[str, str] | None, may_stop: bool
                        ) -> None:
    assert actionspec.in_stream_header(action) == header
    assert actionspec.may_stop(action) is may_stop


@pytest.mark.parametrize(("action", "notifies"), [
    pytest.param(SNSAction(topic_arn="arn:t"), False, id="sns-publishes-itself"),
    pytest.param(S3Action(bucket_name="b", topic_arn="arn:t"), True, id="s3-with-topic"),
    pytest.param(S3Action(bucket_name="b"), False, id="s3-without-topic"),
])
def test_notifies(action: Action, notifies: bool) -> None:
    assert actionspec.notifies(action) is notifies
