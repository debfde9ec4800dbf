"""Stop: ends the evaluation of the whole rule set (SES's only scope, RuleSet)."""

from __future__ import annotations

from .base import ActionContext, Outcome


def run(ctx: ActionContext) -> Outcome:
    return Outcome(disposition="STOP_RULE_SET", detail="stop: rule set ended")
