"""The end-of-data outcome: which changes to Postfix's copy, and in which order."""

from __future__ import annotations

import logging

import pytest

from mxrules.decision import CONTINUE, TEMPFAIL_SPOOL, RcptDecision
from mxrules.lifecycle import (
    ENDINGS,
    DeleteRecipient,
    Discard,
    Ending,
    InsertHeader,
    Manipulation,
    Outcome,
    OwnHeaders,
    RemoveHeader,
    blocked,
    passable,
    recipients_to_remove,
    stored,
)
from mxrules.metrics import MESSAGE_RESULTS

AR = "Authentication-Results"
SES = "X-SES-Spam-Verdict"


@pytest.mark.parametrize(("forged", "headers", "delete", "discard", "expected"), [
    pytest.param([], [], [], False, [], id="nothing-to-change"),
    pytest.param([], [("X-A", "1"), ("X-B", "2")], [], False,
                 [InsertHeader("X-A", "1", 1), InsertHeader("X-B", "2", 2)],
                 id="inserted-below-postfix-received-in-order"),
    pytest.param([(AR, 1), (AR, 3), (AR, 2)], [], [], False,
                 [RemoveHeader(AR, 3), RemoveHeader(AR, 2), RemoveHeader(AR, 1)],
                 id="per-name-highest-occurrence-first"),
    pytest.param([(SES, 1), (AR, 1), (AR, 2)], [("X-A", "1")], [], False,
                 [RemoveHeader(AR, 2), RemoveHeader(AR, 1), RemoveHeader(SES, 1),
                  InsertHeader("X-A", "1", 1)],
                 id="removals-before-insertions"),
    pytest.param([(AR, 1)], [("X-A", "1")], ["a@example.com", "B@example.com"], False,
                 [RemoveHeader(AR, 1), InsertHeader("X-A", "1", 1),
                  DeleteRecipient("a@example.com"), DeleteRecipient("B@example.com")],
                 id="recipients-after-headers"),
    pytest.param([], [("X-A", "1")], [], True,
                 [InsertHeader("X-A", "1", 1), Discard()], id="discard-last"),
])
def test_a_stored_outcome_orders_its_changes(
        forged: list[tuple[str, int]], headers: list[tuple[str, str]], delete: list[str],
        discard: bool, expected: list[Manipulation]) -> None:
    outcome = stored("m1", forged=forged, headers=headers, delete=delete, discard=discard)
    assert outcome.reply == CONTINUE and outcome.message_id == "m1"
    assert list(outcome.manipulations) == expected
    assert outcome.discard is discard


def test_the_views_read_the_changes_in_order() -> None:
    outcome = stored("m1", forged=[(AR, 1), (AR, 2)], headers=[("X-A", "1"), ("X-B", "2")],
                     delete=["r@example.com"], discard=False)
    assert outcome.remove_headers == ((AR, 2), (AR, 1))
    assert outcome.add_headers == (("X-A", "1"), ("X-B", "2"))
    assert outcome.delete_recipients == ("r@example.com",)


def test_a_refusal_changes_nothing() -> None:
    outcome = Outcome(TEMPFAIL_SPOOL)
    assert (outcome.manipulations, outcome.message_id, outcome.discard) == ((), "", False)


@pytest.mark.parametrize(("step", "change"), [
    pytest.param("remove-header", RemoveHeader(AR, 1), id="remove-header"),
    pytest.param("add-header", InsertHeader("X-A", "1", 1), id="add-header"),
    pytest.param("remove-recipient", DeleteRecipient("a@example.com"), id="remove-recipient"),
    pytest.param("discard", Discard(), id="discard"),
])
def test_each_change_names_its_post_commit_step(step: str, change: Manipulation) -> None:
    # The label of mxrules_post_commit_errors_total when the change fails after the commit.
    assert change.step == step


def _rcpt(address: str, outcome: str) -> RcptDecision:
    return RcptDecision(address, outcome, (), CONTINUE)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rcpts", "consume", "expected"), [
    pytest.param([("a@example.com", "accepted")], True, ((), (), True),
                 id="consume-all-handled-discards"),
    pytest.param([("a@example.com", "accepted")], False, ((), (), False),
                 id="deliver-keeps-everything"),
    pytest.param([("A@Example.com", "accepted"), ("f@other.test", "unmanaged")], True,
                 (("A@Example.com",), (), False), id="consume-removes-handled-as-recorded"),
    pytest.param([("a@example.com", "accepted"), ("a@example.com", "accepted"),
                  ("f@other.test", "unmanaged")], True,
                 (("a@example.com",), (), False), id="each-form-once"),
    pytest.param([("us\udcffr@example.com", "accepted"), ("f@other.test", "unmanaged")], True,
                 ((), ("us\udcffr@example.com",), False), id="not-utf8-kept"),
    pytest.param([("a@example.com", "accepted"), ("f@other.test", "unmanaged")], False,
                 ((), (), False), id="deliver-removes-nothing"),
])
def test_recipients_to_remove(rcpts: list[tuple[str, str]], consume: bool,
                              expected: tuple[tuple[str, ...], tuple[str, ...], bool]) -> None:
    decisions = [_rcpt(address, outcome) for address, outcome in rcpts]
    assert recipients_to_remove(decisions, [a for a, _ in rcpts], consume) == expected


@pytest.mark.parametrize(("text", "ok"), [
    pytest.param("a@example.com", True, id="ascii"),
    pytest.param("jöran@example.com", True, id="utf8"),
    pytest.param("a\0b", False, id="nul"),
    pytest.param("a\udcffb", False, id="surrogate"),
])
def test_passable(text: str, ok: bool) -> None:
    assert passable(text) is ok


@pytest.mark.parametrize(("name", "result", "counted"), [
    pytest.param("no-managed-recipient", "passed", set(), id="passed"),
    pytest.param("internal-error", "tempfail", set(), id="internal-error"),
    pytest.param("spool-failed", "tempfail", {"spool"}, id="spool-failed"),
    pytest.param("spool-unwritable", "tempfail", {"spool"}, id="spool-unwritable"),
    pytest.param("too-big", "rejected", {"data:size"}, id="too-big"),
    pytest.param("too-big-for-actions", "rejected", {"data:too-big"}, id="too-big-for-actions"),
    pytest.param("scan-slots-busy", "tempfail", {"slots"}, id="scan-slots-busy"),
    pytest.param("scan-failed", "tempfail", set(), id="scan-failed"),
    pytest.param("unresolved-reject", "rejected", {"data:unresolved-client"},
                 id="unresolved-reject"),
    pytest.param("unresolved-tempfail", "tempfail", set(), id="unresolved-tempfail"),
])
def test_each_ending_is_counted_once_under_bounded_labels(
        name: str, result: str, counted: set[str]) -> None:
    ending = ENDINGS[name]
    assert ending.result == result and ending.result in MESSAGE_RESULTS
    assert ending.level in (logging.INFO, logging.WARNING, logging.ERROR)
    extra = {f"data:{ending.rejection}"} if ending.rejection else set()
    extra |= {"spool"} if ending.spool_failure else set()
    extra |= {"slots"} if ending.slot_timeout else set()
    assert extra == counted


def test_every_ending_is_in_the_table() -> None:
    # A new exit of end of data needs a row (and this test a case) before it can be counted.
    assert len(ENDINGS) == 10


def test_a_blocked_forwarded_message_is_a_data_rejection_for_its_filter_reason() -> None:
    assert blocked("ip-filter") == Ending("rejected", logging.INFO, rejection="ip-filter")


OURS = "mx.example.com"


@pytest.mark.parametrize(("headers", "forged", "kept"), [
    pytest.param([("Subject", b"x")], [], ["Subject"], id="other-headers-pass"),
    pytest.param([(AR, b" mx.example.com; spf=pass")], [(AR, 1)], [], id="ours-forged"),
    pytest.param([(AR, b" other.example; spf=pass"), (AR, b" (c) MX.Example.com.; dkim=pass")],
                 [(AR, 2)], [AR], id="occurrences-counted-whoever-wrote-them"),
    pytest.param([("x-ses-spam-verdict ", b" PASS"), (SES, b" FAIL")],
                 [(SES, 1), (SES, 2)], [], id="verdict-any-case-any-writer"),
    pytest.param([(AR, b' "mx.example.com"; dkim=pass')], [(AR, 1)], [], id="quoted-id"),
])
def test_own_headers_finds_the_forged_occurrences(
        headers: list[tuple[str, bytes]], forged: list[tuple[str, int]], kept: list[str]) -> None:
    own = OwnHeaders(OURS)
    passed = [name for name, value in headers if not own.header(name, value)]
    assert (own.forged, passed) == (forged, kept)
