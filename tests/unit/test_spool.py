"""The spool: the job format and the directory protocol between milter and worker."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from datetime import UTC, datetime

import pytest

from harness.jobs import make_job
from mxrules.errors import CorruptJobError, MxrulesError, SpoolError
from mxrules.ids import new_message_id
from mxrules.rules import AddHeaderAction, LambdaAction, Rule, S3Action, StopAction
from mxrules.spool import (
    JOB_VERSION,
    STATES,
    Client,
    DeadLetter,
    Job,
    MatchedRule,
    Progress,
    Spool,
    retention_victims,
    ses_timestamp,
    with_progress,
)

RULE = Rule(
    name="store", enabled=True, recipients=("info@example.com", ".example.org"),
    tls_policy="Require", scan_enabled=True,
    actions=(AddHeaderAction(header_name="X-Rule", header_value="störe ✓"),
             S3Action(bucket_name="bucket", object_key_prefix="in/",
                      kms_key_arn="arn:aws:kms:us-east-1:1:key/k"),
             LambdaAction(function_arn="arn:aws:lambda:us-east-1:1:function:f",
                          invocation_type="RequestResponse"),
             StopAction(topic_arn="arn:aws:sns:us-east-1:1:t")),
)


def _job(message_id: str | None = None, data: bytes = b"", **changes) -> Job:
    fields = dict(
        message_id=message_id or new_message_id(),
        recipients=("info@example.com", "a@b.example.org"),
        client=Client(address="192.0.2.1", hostname="mail.example.net", helo="mail",
                      tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384"),
        rules=(MatchedRule(RULE, ("info@example.com", "a@b.example.org")),
               MatchedRule(Rule(name="empty", enabled=True), ("info@example.com",))),
        in_stream_headers=(("X-Rule", "störe ✓"),),
        verdicts={"spam": "PASS", "virus": "DISABLED"},
    )
    fields.update(changes)
    return make_job(data, **fields)


# -- encode / decode -------------------------------------------------------------

@pytest.mark.parametrize(
    "job",
    [
        pytest.param(_job(), id="full"),
        pytest.param(_job(mail_from="", rules=(), in_stream_headers=(), verdicts={}),
                     id="null-sender-no-rules"),
        pytest.param(with_progress(_job(), rule=1, action=2, attempts=3, first_attempt_at=1.5,
                                   next_due=99.25, last_error="boom", stopped="rule_set",
                                   done=("S3 ok", "SNS ok")), id="with-progress"),
        pytest.param(with_progress(_job(), failed=((0, 1, "action"), (1, 0, "notify")),
                                   only=((0, 1, "action"),)), id="failed-and-only-steps"),
    ],
)
def test_encode_decode_round_trip(job: Job) -> None:
    raw = job.encode()
    assert raw.endswith(b"\n")
    decoded = Job.decode(raw, job.message_id)
    assert decoded == job
    assert decoded.encode() == raw


def test_encoded_job_is_json_with_a_checksum() -> None:
    job = _job()
    outer = json.loads(job.encode())
    assert sorted(outer) == ["job", "sha256"]
    assert outer["job"]["version"] == JOB_VERSION
    assert outer["job"]["rules"][0]["rule"] == RULE.to_config()
    assert outer["job"]["rules"][0]["recipients"] == ["info@example.com", "a@b.example.org"]
    canonical = json.dumps(outer["job"], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    assert outer["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()


def test_every_single_flipped_byte_is_detected() -> None:
    raw = _job().encode()
    for position in range(len(raw) - 1):  # the final newline is only layout
        damaged = bytearray(raw)
        damaged[position] ^= 0x01
        with pytest.raises(CorruptJobError):
            Job.decode(bytes(damaged), "j")


def test_flipped_byte_in_a_value_is_a_checksum_mismatch() -> None:
    raw = _job().encode()
    at = raw.index(b"mx.example.com")
    damaged = raw[:at] + b"nx" + raw[at + 2:]
    with pytest.raises(CorruptJobError) as info:
        Job.decode(damaged, "the-id")
    assert (info.value.job_id, info.value.cause) == ("the-id", "checksum mismatch")
    assert str(info.value) == "job the-id: checksum mismatch"


def test_every_truncation_is_detected() -> None:
    raw = _job().encode()
    for length in range(len(raw) - 1):
        with pytest.raises(CorruptJobError):
            Job.decode(raw[:length], "j")


@pytest.mark.parametrize(
    ("raw", "cause"),
    [
        pytest.param(b"", "cannot decode job.json", id="empty"),
        pytest.param(b"\xff\xfe", "cannot decode job.json", id="not-utf8"),
        pytest.param(b"[]", "cannot decode job.json", id="not-an-object"),
        pytest.param(b'{"sha256": "x"}', "cannot decode job.json", id="no-job"),
        pytest.param(b'{"job": {}}', "cannot decode job.json", id="no-checksum"),
    ],
)
def test_decode_garbage(raw: bytes, cause: str) -> None:
    with pytest.raises(CorruptJobError) as info:
        Job.decode(raw, "j")
    assert info.value.cause.startswith(cause)


def _reseal(body: dict) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    check = hashlib.sha256(text.encode()).hexdigest()
    return json.dumps({"job": body, "sha256": check}).encode()


def test_unknown_version_is_refused_even_with_a_good_checksum() -> None:
    body = json.loads(_job().encode())["job"]
    body["version"] = JOB_VERSION + 1
    with pytest.raises(CorruptJobError) as info:
        Job.decode(_reseal(body), "j")
    assert info.value.cause == f"unknown job version {JOB_VERSION + 1}"


def test_missing_field_with_a_good_checksum() -> None:
    body = json.loads(_job().encode())["job"]
    del body["client"]
    with pytest.raises(CorruptJobError, match=r"cannot decode job\.json"):
        Job.decode(_reseal(body), "j")


def _set(body: dict, path: str, value: object) -> None:
    """Set `a.b[0].c` in a job body; the value `DELETE` removes the key."""
    keys: list[str | int] = []
    for part in path.replace("]", "").replace("[", ".").split("."):
        keys.append(int(part) if part.isdigit() else part)
    parent = body
    for key in keys[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = value


DELETE = object()


@pytest.mark.parametrize(("path", "value", "cause"), [
    pytest.param("progress.rule", "0", "progress.rule: expected an integer >= 0, not '0'",
                 id="rule-a-string"),
    pytest.param("progress.rule", -1, "progress.rule: expected an integer >= 0",
                 id="rule-negative"),
    pytest.param("progress.action", 1.0, "progress.action: expected an integer",
                 id="action-float"),
    pytest.param("progress.attempts", True, "progress.attempts: expected an integer",
                 id="attempts-bool"),
    pytest.param("progress.attempts", 10**400, "progress.attempts: expected an integer",
                 id="attempts-huge"),
    pytest.param("progress.next_due", float("nan"), "progress.next_due: expected a finite number",
                 id="next-due-nan"),
    pytest.param("progress.first_attempt_at", float("inf"),
                 "progress.first_attempt_at: expected a finite number", id="first-attempt-inf"),
    pytest.param("progress.next_due", "soon", "progress.next_due: expected a finite number",
                 id="next-due-string"),
    pytest.param("progress.last_error", None, "progress.last_error: expected a string",
                 id="last-error-null"),
    pytest.param("progress.stopped", "rule", "progress.stopped: expected one of",
                 id="stopped-unknown"),
    pytest.param("progress.phase", "notify",
                 "progress.phase: 'notify' for an action without a topic_arn",
                 id="notify-without-topic"),
    pytest.param("progress.disposition", ["STOP_RULE"], "progress.disposition: expected one of",
                 id="disposition-list"),
    pytest.param("progress.done", "S3 ok", "progress.done: expected a list", id="done-a-string"),
    pytest.param("progress.added_headers", [["X-A"]], "progress.added_headers[0]: expected a "
                 "[name, value] pair", id="added-header-half"),
    pytest.param("progress.surprise", 1, "progress: unknown field 'surprise'",
                 id="progress-unknown-field"),
    pytest.param("progress", [], "progress: expected an object", id="progress-a-list"),
    pytest.param("message_size", "12", "message_size: expected an integer", id="size-a-string"),
    pytest.param("recipients", "a@example.com", "recipients: expected a list",
                 id="recipients-a-string"),
    pytest.param("recipients.0", 7, "recipients[0]: expected a string", id="recipient-a-number"),
    pytest.param("client.helo", 1, "client.helo: expected a string", id="helo-a-number"),
    pytest.param("client.surprise", "x", "client: unknown field 'surprise'",
                 id="client-unknown-field"),
    pytest.param("verdicts.spam", False, "verdicts.spam: expected a string", id="verdict-bool"),
    pytest.param("in_stream_headers.0", ["X-Rule", 1], "in_stream_headers[0][1]: expected a "
                 "string", id="header-value-a-number"),
    pytest.param("rules", {}, "rules: expected a list", id="rules-an-object"),
    pytest.param("rules.0.rule.name", None, "rules[0].rule.name: expected a string",
                 id="rule-name-null"),
    pytest.param("rules.0.rule.tls_policy", "Maybe", "rules[0].rule.tls_policy: expected one of",
                 id="tls-policy-unknown"),
    pytest.param("rules.0.rule.actions.1.s3.bucket_name", ["b"],
                 "rules[0].rule.actions[1].s3.bucket_name: expected a string",
                 id="bucket-a-list"),
    pytest.param("rules.0.rule.actions.1", {"ftp": {}},
                 "rules[0].rule.actions[1]: expected one of the action keys", id="action-unknown"),
    pytest.param("rules.0.rule.actions.1.s3.region", "x",
                 "rules[0].rule.actions[1].s3: unknown field 'region'", id="action-field-unknown"),
])
def test_wrong_type_with_a_good_checksum_is_corrupt_with_its_cause(path: str, value: object,
                                                                    cause: str) -> None:
    body = json.loads(_job().encode())["job"]
    _set(body, path, value)
    with pytest.raises(CorruptJobError) as info:
        Job.decode(_reseal(body), "j")
    assert info.value.cause.startswith("cannot decode job.json: " + cause), info.value.cause


@pytest.mark.parametrize(("path", "value"), [
    pytest.param("progress.first_attempt_at", None, id="no-first-attempt"),
    pytest.param("progress.next_due", 12, id="integral-next-due"),
    pytest.param("rules.0.rule.actions.1.s3.kms_key_arn", None, id="optional-field-null"),
    pytest.param("progress.phase", "notify", id="notify-with-topic"),
    pytest.param("progress", DELETE, id="no-progress"),
])
def test_well_typed_variants_still_decode(path: str, value: object) -> None:
    body = json.loads(_job().encode())["job"]
    if path == "progress.phase":
        _set(body, "progress.action", 3)  # the StopAction, which has a topic_arn
    _set(body, path, value)
    Job.decode(_reseal(body), "j")


@pytest.mark.parametrize(("steps", "cause"), [
    pytest.param([[0, 1]], "progress.failed[0]: expected a [rule, action, phase] step",
                 id="too-short"),
    pytest.param([["0", 1, "action"]], "progress.failed[0][0]: expected an integer >= 0",
                 id="rule-not-an-int"),
    pytest.param([[0, True, "action"]], "progress.failed[0][1]: expected an integer >= 0",
                 id="a-bool-is-no-index"),
    pytest.param([[0, 1, "later"]], "progress.failed[0][2]: expected one of", id="unknown-phase"),
    pytest.param("xyz", "progress.failed: expected a list", id="not-a-list-of-steps"),
])
def test_bad_failed_steps_make_a_corrupt_job(steps: object, cause: str) -> None:
    body = json.loads(_job().encode())["job"]
    body["progress"]["failed"] = steps
    with pytest.raises(CorruptJobError) as info:
        Job.decode(_reseal(body), "j")
    assert info.value.cause.startswith("cannot decode job.json: " + cause), info.value.cause




def test_corrupt_job_error_is_a_spool_error() -> None:
    assert issubclass(CorruptJobError, SpoolError)
    assert issubclass(SpoolError, MxrulesError)
    assert not issubclass(SpoolError, OSError)


# -- JobWriter ---------------------------------------------------------------------

def _listing(root) -> dict[str, list[str]]:
    return {state: sorted(os.listdir(os.path.join(root, state))) for state in ("tmp", *STATES)}


def test_job_writer_streams_and_commits(tmp_path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    message_id = new_message_id()
    writer = spool.new_job(message_id)
    chunks = [b"Subject:hi\r\n", b"\r\n", b"x" * 70_000, b"\x00\xff binary\r\n", b""]
    for chunk in chunks:
        writer.write(chunk)
    data = b"".join(chunks)
    assert writer.size == len(data)
    assert writer.sha256 == hashlib.sha256(data).hexdigest()
    # Streamed to disk under tmp/ as it comes, not held in memory until commit.
    assert os.path.getsize(os.path.join(spool.root, "tmp", message_id, "message")) >= 70_000

    job = _job(message_id, data)
    target = writer.commit(job)
    assert target == os.path.join(spool.root, "incoming", message_id)
    assert _listing(spool.root) == {"tmp": [], "incoming": [message_id], "active": [],
                                    "deferred": [], "failed": [], "corrupt": []}
    assert sorted(os.listdir(target)) == ["job.json", "message"]
    with open(spool.message_path("incoming", message_id), "rb") as fh:
        stored = fh.read()
    assert stored == data
    loaded = spool.load("incoming", message_id)
    assert loaded == job
    assert loaded.message_size == len(stored)
    assert loaded.message_sha256 == hashlib.sha256(stored).hexdigest()
    assert spool.find(message_id) == "incoming"
    assert spool.ids("incoming") == [message_id]
    assert list(spool.jobs("incoming")) == [(message_id, job)]


def test_abort_leaves_nothing(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    writer = spool.new_job(new_message_id())
    writer.write(b"partial")
    writer.abort()
    writer.abort()  # twice is harmless
    assert _listing(spool.root) == {state: [] for state in ("tmp", *STATES)}


def test_commit_failure_raises_spool_error_and_cleans_up(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    message_id = new_message_id()
    writer = spool.new_job(message_id)
    writer.write(b"data")
    os.rmdir(os.path.join(spool.root, "incoming"))
    with open(os.path.join(spool.root, "incoming"), "w") as fh:  # the target is unusable
        fh.write("not a directory")
    with pytest.raises(SpoolError, match=f"cannot commit job {message_id}"):
        writer.commit(_job(message_id, b"data"))
    assert os.listdir(os.path.join(spool.root, "tmp")) == []


def test_same_message_id_twice_is_refused(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    message_id = new_message_id()
    spool.new_job(message_id)
    with pytest.raises(SpoolError):
        spool.new_job(message_id)


def test_spool_directory_that_is_a_file_raises_spool_error(tmp_path) -> None:
    root = tmp_path / "spool"
    root.write_text("oops")
    spool = Spool(str(root))
    with pytest.raises(SpoolError) as info:
        spool.new_job(new_message_id())
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(SpoolError):
        spool.ids("incoming")
    with pytest.raises(SpoolError):
        spool.clean_tmp(older_than=0, now=1e12)
    with pytest.raises(SpoolError):
        spool.load("incoming", new_message_id())
    root.unlink()
    writer = spool.new_job(new_message_id())  # usable again once the directory is back
    writer.abort()


def test_state_directory_that_is_a_file_raises_spool_error(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    (tmp_path / "tmp").write_text("oops")
    with pytest.raises(SpoolError):
        spool.new_job(new_message_id())


def test_ensure_recreates_removed_directories(tmp_path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.ensure()
    os.rmdir(os.path.join(spool.root, "incoming"))
    spool.new_job(new_message_id()).abort()
    assert sorted(os.listdir(spool.root)) == sorted(["tmp", *STATES, "done"])


# -- reading -----------------------------------------------------------------------

def test_load_of_damaged_or_missing_job_json(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    good, flipped, cut, empty = (new_message_id() for _ in range(4))
    for message_id in (good, flipped, cut):
        writer = spool.new_job(message_id)
        writer.write(b"m")
        writer.commit(_job(message_id, b"m"))
    os.makedirs(spool.path("incoming", empty))
    meta = tmp_path / "incoming" / flipped / "job.json"
    raw = bytearray(meta.read_bytes())
    raw[len(raw) // 2] ^= 0x20
    meta.write_bytes(bytes(raw))
    meta = tmp_path / "incoming" / cut / "job.json"
    meta.write_bytes(meta.read_bytes()[: len(meta.read_bytes()) // 3])

    causes = {}
    for message_id in (flipped, cut, empty):
        with pytest.raises(CorruptJobError) as info:
            spool.load("incoming", message_id)
        assert info.value.job_id == message_id
        causes[message_id] = info.value.cause
    assert causes[empty] == "job.json is missing"
    results = dict(spool.jobs("incoming"))
    assert isinstance(results.pop(good), Job)
    assert set(results) == {flipped, cut, empty}
    assert all(isinstance(r, CorruptJobError) for r in results.values())


def _committed(spool: Spool, message_id: str | None = None) -> str:
    message_id = message_id or new_message_id()
    writer = spool.new_job(message_id)
    writer.write(b"m")
    writer.commit(_job(message_id, b"m"))
    return message_id


def _as_directory(meta: str) -> None:
    os.unlink(meta)
    os.mkdir(meta)


def _as_link(meta: str) -> None:
    os.rename(meta, meta + ".real")
    os.symlink(meta + ".real", meta)


def _as_fifo(meta: str) -> None:
    os.unlink(meta)
    os.mkfifo(meta)


@pytest.mark.parametrize(("damage", "cause"), [
    pytest.param(_as_directory, "job.json is not a regular file", id="directory"),
    pytest.param(_as_link, "job.json is a symbolic link", id="symlink"),
    pytest.param(_as_fifo, "job.json is not a regular file", id="fifo-never-blocks"),
])
def test_job_json_that_is_not_a_file_is_corrupt_and_moved_aside(tmp_path, damage,
                                                                 cause: str) -> None:
    spool = Spool(str(tmp_path))
    message_id = _committed(spool)
    damage(os.path.join(spool.path("incoming", message_id), "job.json"))
    with pytest.raises(CorruptJobError) as info:
        spool.load("incoming", message_id)
    assert info.value.cause == cause
    with pytest.raises(CorruptJobError):
        spool.claim("incoming", message_id)
    assert spool.find(message_id) == "corrupt"


def test_job_json_of_another_message_is_corrupt(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    mine, other = _committed(spool), new_message_id()
    meta = os.path.join(spool.path("incoming", mine), "job.json")
    with open(meta, "wb") as fh:
        fh.write(_job(other).encode())
    with pytest.raises(CorruptJobError) as info:
        spool.load("incoming", mine)
    assert info.value.cause == f"job.json is for message {other!r}"


def test_save_replaces_a_link_planted_at_its_temporary_file(tmp_path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    message_id = _committed(spool)
    victim = tmp_path / "victim"
    victim.write_text("not the spool's\n")
    directory = spool.path("incoming", message_id)
    os.symlink(victim, os.path.join(directory, "job.json.tmp"))
    claim = spool.claim("incoming", message_id)
    assert claim is not None
    claim.save(with_progress(claim.job, attempts=1))
    claim.release()
    assert victim.read_text() == "not the spool's\n"
    meta = os.path.join(spool.path("active", message_id), "job.json")
    assert not os.path.islink(meta)
    assert spool.load("active", message_id).progress.attempts == 1


def test_a_link_planted_as_the_lock_is_refused_and_nothing_is_held(tmp_path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    message_id = _committed(spool)
    target = tmp_path / "elsewhere"
    lock = os.path.join(spool.path("incoming", message_id), "lock")
    os.symlink(target, lock)
    with pytest.raises(SpoolError, match="cannot open lock"):
        spool.claim("incoming", message_id)
    assert not target.exists()  # not created through the link
    os.unlink(lock)
    claim = spool.claim("incoming", message_id)
    assert claim is not None
    claim.release()


def test_a_job_moved_on_since_the_listing_is_not_reported_corrupt(tmp_path,
                                                                   monkeypatch) -> None:
    spool = Spool(str(tmp_path))
    stays, moves = _committed(spool), _committed(spool)
    listing = spool.ids("incoming")
    spool.move(moves, "incoming", "deferred")  # a worker, between the listing and the read
    monkeypatch.setattr(spool, "ids", lambda state: listing if state == "incoming" else [])
    assert [job_id for job_id, _ in spool.jobs("incoming")] == [stays]


def test_ids_lists_only_message_ids_in_order(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    spool.ensure()
    ids = [new_message_id(now_ns=n) for n in (3, 1, 2)]
    for message_id in ids:
        os.mkdir(spool.path("deferred", message_id))
    os.mkdir(spool.path("deferred", "not-an-id"))
    (tmp_path / "deferred" / ".hidden").write_text("")
    assert spool.ids("deferred") == sorted(ids)
    assert spool.ids("deferred")[0] == ids[1]
    assert Spool(str(tmp_path / "absent")).ids("incoming") == []
    assert spool.find(ids[0]) == "deferred"
    assert spool.find(new_message_id()) is None


def test_clean_tmp_removes_only_old_entries(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    old, fresh, edge = new_message_id(), new_message_id(), new_message_id()
    for message_id in (old, fresh, edge):
        spool.new_job(message_id).write(b"abandoned")
    os.mkdir(spool.path("tmp", "not-a-job"))
    now = 1_000_000.0
    for message_id, age in ((old, 3601), (edge, 3600), (fresh, 10)):
        os.utime(os.path.join(spool.path("tmp", message_id), "message"), (now - age, now - age))
        os.utime(spool.path("tmp", message_id), (now - age, now - age))
    os.utime(spool.path("tmp", "not-a-job"), (0, 0))
    assert spool.clean_tmp(older_than=3600, now=now) == 1
    assert sorted(os.listdir(os.path.join(spool.root, "tmp"))) == sorted(
        [fresh, edge, "not-a-job"])
    assert spool.clean_tmp(older_than=3600, now=now) == 0


def test_clean_tmp_keeps_a_slow_reception_whose_file_still_grows(tmp_path) -> None:
    """A directory's mtime stands still while its message file is written to."""
    spool = Spool(str(tmp_path))
    message_id = new_message_id()
    spool.new_job(message_id).write(b"still arriving")
    now = 1_000_000.0
    os.utime(spool.path("tmp", message_id), (now - 7200, now - 7200))
    os.utime(os.path.join(spool.path("tmp", message_id), "message"), (now - 5, now - 5))
    assert spool.clean_tmp(older_than=3600, now=now) == 0
    assert os.listdir(os.path.join(spool.root, "tmp")) == [message_id]


def test_clean_tmp_leaves_committed_jobs(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    message_id = new_message_id()
    writer = spool.new_job(message_id)
    writer.commit(_job(message_id))
    os.utime(spool.path("incoming", message_id), (0, 0))
    assert spool.clean_tmp(older_than=1, now=1e12) == 0
    assert spool.find(message_id) == "incoming"


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        pytest.param(datetime(2026, 1, 1, tzinfo=UTC), "2026-01-01T00:00:00.000Z",
                     id="midnight"),
        pytest.param(datetime(2026, 3, 4, 5, 6, 7, 891_999, tzinfo=UTC),
                     "2026-03-04T05:06:07.891Z", id="milliseconds-truncated"),
        pytest.param(datetime.fromisoformat("2026-06-30T23:59:59.5+02:00"),
                     "2026-06-30T21:59:59.500Z", id="converted-to-utc"),
    ],
)
def test_ses_timestamp(when: datetime, expected: str) -> None:
    assert ses_timestamp(when) == expected


def test_ses_timestamp_now_has_ses_shape() -> None:
    stamp = ses_timestamp()
    assert len(stamp) == 24 and stamp[10] == "T" and stamp.endswith("Z")
    assert datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")


def test_with_progress_changes_only_progress() -> None:
    job = _job()
    later = with_progress(job, action=1, done=("AddHeader ok",))
    assert later.progress == Progress(action=1, done=("AddHeader ok",))
    assert job.progress == Progress()
    assert later.message_id == job.message_id


def test_a_finish_that_can_neither_move_nor_save_keeps_the_job_held(tmp_path,
                                                                      monkeypatch) -> None:
    """A full disk at the end: the caller still holds the job, so it can hold on
    until the progress is saved, instead of the next claim repeating the last action."""
    spool = Spool(str(tmp_path / "spool"))
    message_id = new_message_id()
    writer = spool.new_job(message_id)
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    writer.commit(_job(message_id, b"Subject: x\r\n\r\nbody\r\n"))
    claim = spool.claim("incoming", message_id)
    assert claim is not None
    real_rename = os.rename

    def full(src, dst):
        raise OSError(28, "No space left on device")

    def no_room_in_done(src, dst):
        if os.path.basename(os.path.dirname(dst)) == "done":
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", full)
    with pytest.raises(OSError):
        claim.finish(claim.job)  # the move fails, and the save's own rename too
    assert claim.fd >= 0  # still ours
    monkeypatch.setattr(os, "rename", real_rename)
    claim.save(claim.job)
    claim.release()
    assert spool.ids("active") == [message_id]

    # When only the move fails, the progress is saved and the lock let go.
    claim = spool.claim("active", message_id)
    assert claim is not None
    monkeypatch.setattr(os, "rename", no_room_in_done)
    with pytest.raises(OSError):
        claim.finish(claim.job)
    assert claim.fd < 0


# -- dead letters: requeue and retention ---------------------------------------------

def _dead_letter(spool: Spool, body: bytes = b"x", **progress) -> str:
    writer = spool.new_job(new_message_id())
    writer.write(body)
    job = with_progress(_job(writer.message_id, body), **progress)
    writer.commit(job)
    claim = spool.claim("incoming", job.message_id)
    assert claim is not None
    claim.move("failed")
    return job.message_id


def test_requeue_of_a_job_with_failed_actions_runs_only_those(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    job_id = _dead_letter(spool, rule=2, action=0, attempts=3, last_error="boom",
                          stopped="rule_set", added_headers=(("X-Rule", "störe ✓"),),
                          failed=((0, 1, "action"), (0, 3, "notify")), done=("a", "b"))
    job = spool.requeue(job_id)
    assert spool.find(job_id) == "incoming"
    p = job.progress
    assert (p.rule, p.action, p.phase, p.stopped, p.attempts, p.last_error) == (
        0, 0, "action", "", 0, "")
    assert p.only == ((0, 1, "action"), (0, 3, "notify")) and p.failed == ()
    assert p.added_headers == () and p.done == ("a", "b")
    assert spool.load("incoming", job_id) == job


def test_requeue_of_a_job_dead_lettered_mid_plan_goes_on_from_there(tmp_path) -> None:
    """A dead letter from before failed actions were recorded: as it always was."""
    spool = Spool(str(tmp_path))
    job_id = _dead_letter(spool, rule=0, action=1, attempts=5, last_error="boom")
    p = spool.requeue(job_id).progress
    assert (p.rule, p.action, p.attempts, p.only) == (0, 1, 0, ())


def _letter(name: str, since: float, size: int) -> DeadLetter:
    return DeadLetter(name, since, size)


LETTERS = [_letter("c", 300.0, 30), _letter("a", 100.0, 10), _letter("b", 200.0, 20)]


@pytest.mark.parametrize(
    ("max_age", "max_size", "now", "removed"),
    [
        pytest.param(0, 0, 10_000.0, [], id="no-limits"),
        pytest.param(250, 0, 500.0, [("a", "age"), ("b", "age")], id="age-oldest-first"),
        pytest.param(400, 0, 500.0, [], id="age-exactly-at-the-limit-kept"),
        pytest.param(0, 60, 500.0, [], id="size-exactly-at-the-limit"),
        pytest.param(0, 59, 500.0, [("a", "size")], id="size-one-over"),
        pytest.param(0, 30, 500.0, [("a", "size"), ("b", "size")], id="size-oldest-first"),
        pytest.param(0, 1, 500.0, [("a", "size"), ("b", "size"), ("c", "size")],
                     id="size-everything"),
        pytest.param(350, 30, 500.0, [("a", "age"), ("b", "size")], id="age-then-size"),
    ],
)
def test_retention_victims(max_age: float, max_size: int, now: float,
                           removed: list[tuple[str, str]]) -> None:
    victims = retention_victims(LETTERS, max_age, max_size, now)
    assert [(letter.job_id, why) for letter, why in victims] == removed


def test_dead_letters_and_their_removal(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    old = _dead_letter(spool, b"x" * 1000)
    new = _dead_letter(spool, b"y" * 10)
    meta = os.path.join(spool.path("failed", old), "job.json")
    os.utime(meta, (1000.0, 1000.0))
    letters = spool.dead_letters()
    assert [letter.job_id for letter in letters] == [old, new]
    assert letters[0].since == 1000.0
    sizes = {i: sum(e.stat().st_size for e in os.scandir(spool.path("failed", i)))
             for i in (old, new)}
    assert [letter.size for letter in letters] == [sizes[old], sizes[new]]
    assert spool.remove_dead_letter(old) is True
    assert spool.find(old) is None and os.listdir(os.path.join(str(tmp_path), "done")) == []
    assert spool.remove_dead_letter(old) is False  # already gone
    assert [letter.job_id for letter in spool.dead_letters()] == [new]


def test_a_held_dead_letter_is_not_removed(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    job_id = _dead_letter(spool)
    fd = os.open(os.path.join(spool.path("failed", job_id), "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert spool.remove_dead_letter(job_id) is False
        assert spool.find(job_id) == "failed"
    finally:
        os.close(fd)


# -- a stopping milter drops the receptions it has open ------------------------------

def _commit(writer, message_id: str) -> None:
    writer.commit(_job(message_id, b"data"))


@pytest.mark.parametrize(("before", "dropped", "incoming"), [
    pytest.param(lambda w, m: None, 1, False, id="in-progress-is-dropped"),
    pytest.param(_commit, 0, True, id="committed-stands-whole"),
    pytest.param(lambda w, m: w.abort(), 0, False, id="aborted-is-not-counted"),
])
def test_stop_receiving(tmp_path, before, dropped: int, incoming: bool) -> None:
    spool = Spool(str(tmp_path))
    message_id = new_message_id()
    writer = spool.new_job(message_id)
    writer.write(b"data")
    before(writer, message_id)
    assert spool.stop_receiving() == dropped
    assert spool.ids("tmp") == []
    if incoming:
        assert sorted(os.listdir(spool.path("incoming", message_id))) == ["job.json", "message"]
        assert spool.load("incoming", message_id).message_id == message_id
    else:
        assert spool.ids("incoming") == []


def test_a_dropped_reception_takes_no_more_data_and_is_never_committed(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    message_id = new_message_id()
    writer = spool.new_job(message_id)
    writer.write(b"data")
    assert writer.abandon() is True
    assert writer.abandon() is False
    with pytest.raises(OSError, match="dropped"):
        writer.write(b"more")
    with pytest.raises(OSError, match="dropped"):
        writer.flush()
    with pytest.raises(SpoolError, match="dropped"):
        writer.commit(_job(message_id, b"data"))
    writer.abort()
    assert _listing(spool.root) == {state: [] for state in ("tmp", *STATES)}


def test_no_reception_starts_once_receiving_stopped(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    assert spool.stop_receiving() == 0
    with pytest.raises(SpoolError, match="stopping"):
        spool.new_job(new_message_id())
    assert spool.ids("tmp") == []


def test_abort_after_commit_leaves_the_job(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    message_id = new_message_id()
    writer = spool.new_job(message_id)
    writer.write(b"data")
    _commit(writer, message_id)
    writer.abort()
    assert writer.abandon() is False
    assert spool.ids("incoming") == [message_id]
