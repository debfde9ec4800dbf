"""Fault injection: the whole chain (real Postfix, milter, worker, moto S3) under faults.

Each test ends with the same proof: every message the client was given 250 for
has its S3 object, or is a dead letter in the spool's failed/ (zero lost), and
the duplicates are counted against a stated bound.  The counts of each run are
printed in the "fault injection" section at the end of pytest's output.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from harness.faults import (
    PREFIX,
    RCPT,
    SENDER,
    AwsProxy,
    Chain,
    Progress,
    RawSession,
    Sent,
    fill,
    mail,
    recorded_puts,
    report,
    sample,
    send_all,
)
from harness.waiting import wait_until

pytestmark = pytest.mark.postfix

MakeChain = Callable[..., Chain]



def in_background(target: Callable[[], list[Sent]]) -> Callable[[], list[Sent]]:
    """Run a sender in a thread; the returned function joins it and gives its result."""
    box: list[list[Sent]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(target())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> list[Sent]:
        thread.join(120)
        if errors:
            raise errors[0]
        assert box, "sender did not finish"
        return box[0]

    return join


def accepted(sent: list[Sent]) -> set[str]:
    return {s.message_id for s in sent if s.accepted}


# -- 1 ----------------------------------------------------------------------------------------

def test_milter_killed_during_data_tempfails_and_leaves_no_job(make_chain: MakeChain) -> None:
    """kill -9 of the milter mid-DATA: 4xx, no live job, then the same message goes once."""
    chain = make_chain()
    first_id, first = mail("mid-data", 1)

    # Killed while the client is still sending (before the final dot).
    session = RawSession(chain.postfix.smtp_port)
    assert session.command("EHLO client.test")[0] == 250
    assert session.command(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert session.command(f"RCPT TO:<{RCPT}>")[0] == 250
    assert session.command("DATA")[0] == 354
    session.write(first[: len(first) // 2])
    chain.milter.kill()
    session.write(first[len(first) // 2:] + b".\r\n")
    code, text = session.reply()
    session.close()
    assert 400 <= code < 500, (code, text)
    assert chain.counts()["incoming"] == 0

    # Killed while it writes a large message into the spool (after the final dot).
    chain.milter.start()
    big_id, big = mail("mid-spool", 3, body=(b"y" * 998 + b"\r\n") * 20_000)  # 20 MB
    big_sent, left, attempts = _kill_milter_mid_spool(chain, big_id, big)
    data = big_sent.tries[-1].data
    assert data is not None and 400 <= data[0] < 500, big_sent.tries
    counts = chain.counts()
    assert counts["incoming"] == counts["active"] == counts["deferred"] == 0, counts
    assert chain.spool.ids("tmp") == [left]  # the half-written reception, not a job
    assert not os.path.exists(os.path.join(chain.spool.root, "tmp", left, "job.json"))

    # The janitor removes receptions older than twice milter.timeout when the milter
    # starts: age the leftover instead of waiting.
    old = time.time() - 7200
    tmp = os.path.join(chain.spool.root, "tmp", left)
    for name in os.listdir(tmp):
        os.utime(os.path.join(tmp, name), (old, old))
    os.utime(tmp, (old, old))
    log_at = len(chain.milter.log())
    chain.milter.start()
    chain.milter.wait_for_log(r"removed 1 abandoned reception", after=log_at)
    assert chain.spool.ids("tmp") == []

    # The client tries again, as it was told to: each message is accepted and stored once.
    sent = [_send_one(chain, first_id, first), _send_one(chain, big_id, big)]
    assert all(s.accepted for s in sent), sent
    chain.wait_idle()
    tally = chain.account(accepted(sent))
    report("milter-kill-9", tally, sends_to_catch_it=attempts)
    assert tally.lost == set() and tally.strangers == set()
    assert tally.duplicates == 0
    assert sorted(tally.landed.values()) == [1, 1]
    assert chain.counts()["failed"] == 0


def _kill_milter_mid_spool(chain: Chain, mid: str, raw: bytes) -> tuple[Sent, str, int]:
    """Send `raw` and kill -9 the milter once its reception shows in tmp/.

    The milter gets the body only after Postfix has the whole message, and writes
    20 MB in a fraction of a second: the spool is watched closely, and on a machine
    quick enough to finish first (the client got 250) the message is sent again.
    """
    for attempt in range(1, 4):
        sending = in_background(lambda: [_send_one(chain, mid, raw)])
        deadline = time.monotonic() + 60
        while not (left := chain.spool.ids("tmp")) and time.monotonic() < deadline:
            if chain.spool.ids("incoming") or chain.spool.ids("active"):
                break
            time.sleep(0.001)
        if left:
            chain.milter.kill()
            [sent] = sending()
            return sent, left[0], attempt
        [sent] = sending()
        assert sent.accepted, sent.tries
        chain.wait_idle()
        chain.moto.client("s3").delete_objects(Bucket="mail-bucket", Delete={"Objects": [
            {"Key": k} for k in chain.moto.s3_keys("mail-bucket", PREFIX)]})
    pytest.fail("the milter never was caught writing the message")


def _send_one(chain: Chain, mid: str, raw: bytes) -> Sent:
    sent = Sent(mid)
    sent.tries.append(chain.send(raw))
    return sent


# -- 2 ----------------------------------------------------------------------------------------

def test_worker_killed_5_times_during_500_messages(make_chain: MakeChain) -> None:
    """kill -9 of the worker, 5 times, while 500 messages flow: all land, dups <= kills.

    One worker thread: a kill interrupts at most one action, which runs again after the
    restart (the job is taken over from active/), so each kill may cost one duplicate.
    """
    chain = make_chain(worker={"threads": 1})
    messages = [mail("worker-kill", i) for i in range(500)]
    progress = Progress()
    sending = in_background(lambda: send_all(chain, messages, sessions=4, progress=progress))
    kills = 0
    for at in (70, 150, 230, 310, 390):
        progress.wait_for(at)
        # Killed while it holds a job, when it can be caught so (it is busy as mail flows).
        wait_until = time.monotonic() + 5
        while not chain.spool.ids("active") and time.monotonic() < wait_until:
            time.sleep(0.001)
        chain.worker.kill()
        kills += 1
        chain.worker.start()
    sent = sending()
    assert all(s.accepted for s in sent), [s for s in sent if not s.accepted][:3]
    chain.wait_idle(timeout=90)
    tally = chain.account(accepted(sent))
    recovered = chain.worker.log().count("job recovered from a worker")
    report("worker-kill-9", tally, kills=kills, recovered=recovered)
    assert tally.lost == set() and tally.strangers == set()
    assert sum(tally.landed.values()) == 500 and tally.extra_objects == 0
    assert tally.repeated_puts <= kills, tally.summary()
    assert recovered >= 1  # a job held by a killed worker was taken over
    assert chain.counts() == {"tmp": 0, "incoming": 0, "active": 0, "deferred": 0,
                              "failed": 0, "corrupt": 0}


# -- 3 ----------------------------------------------------------------------------------------

def test_aws_refuses_then_hangs_then_500s_then_recovers(make_chain: MakeChain,
                                                        aws_proxy: AwsProxy) -> None:
    """The endpoint refuses, hangs, answers 500, then works: every job lands, none dies."""
    chain = make_chain(endpoint_url=aws_proxy.url, aws={"read_timeout": 1},
                       worker={"retry_max_delay": 0.3})
    sent = send_all(chain, [mail("aws", i) for i in range(20)])
    assert all(s.accepted for s in sent)

    def errors(reason: str) -> float:
        return sample(chain.worker_metrics(), "mxrules_action_errors_total",
                      type="S3", reason=reason)

    wait_until(lambda: errors("connection") >= 5, "connection refused errors")
    aws_proxy.set_mode("hang")
    wait_until(lambda: errors("timeout") >= 2, "timeouts")
    aws_proxy.set_mode("error")
    wait_until(lambda: errors("server-error") >= 5, "500 errors")
    assert chain.moto.s3_keys("mail-bucket", PREFIX) == []
    assert chain.counts()["failed"] == 0

    aws_proxy.set_mode("forward")
    chain.wait_idle()
    tally = chain.account(accepted(sent))
    metrics = chain.worker_metrics()
    retries = sample(metrics, "mxrules_actions_total", type="S3", outcome="retry")
    report("aws-outage", tally, retries=int(retries),
           refused=int(errors("connection")), timeouts=int(errors("timeout")),
           server_errors=int(errors("server-error")))
    assert tally.lost == set() and tally.strangers == set()
    assert sum(tally.landed.values()) == 20 and tally.duplicates == 0
    assert chain.counts()["failed"] == 0
    assert sample(metrics, "mxrules_dead_letters_total") == 0
    assert retries >= 12
    assert sample(metrics, "mxrules_actions_total", type="S3", outcome="ok") == 20
    log = chain.worker.log()
    for reason in ("connection", "timeout", "server-error"):
        assert f"S3 action: {reason}:" in log, reason
    assert aws_proxy.seen["hang"] >= 2 and aws_proxy.seen["error"] >= 5


# -- 4 ----------------------------------------------------------------------------------------

def test_spool_filesystem_full_answers_451_and_recovers(make_chain: MakeChain,
                                                        small_fs: Any) -> None:
    """A full spool filesystem: 451 4.3.0; queued jobs wait without repeating an action;
    when space returns the same messages are accepted, with nothing restarted."""
    rules = [{"name": "store", "enabled": True, "recipients": [RCPT],
              "actions": [{"s3": {"bucket_name": "mail-bucket", "object_key_prefix": PREFIX}},
                          {"s3": {"bucket_name": "mail-bucket", "object_key_prefix": "copy/"}}]}]
    chain = make_chain(spool_dir=small_fs, rules=rules)
    chain.worker.stop()
    early = send_all(chain, [mail("before-full", i) for i in range(2)])
    assert all(s.accepted for s in early)
    filler = fill(small_fs)

    # Small ones fail at the commit's flush, the large one while its body is written.
    later = [mail("while-full", 0), mail("while-full", 1, body=(b"z" * 998 + b"\r\n") * 100),
             mail("while-full", 2)]
    refused = send_all(chain, later, sessions=1)
    for s in refused:
        data = s.tries[0].data
        assert data is not None and data[0] == 451, s.tries
        assert "4.3.0 Temporary failure storing the message" in data[1], s.tries
    assert chain.counts()["incoming"] == 2 and chain.spool.ids("tmp") == []

    # The queued jobs' first action runs, but its progress cannot be saved: each job
    # is held (not handed back to run that action again) until there is room.
    chain.worker.start()
    wait_until(lambda: len(chain.moto.s3_keys("mail-bucket", PREFIX)) == 2, "first actions")
    time.sleep(1)
    held = recorded_puts(chain.moto)
    assert sum(held.values()) == 2 and len(chain.spool.ids("active")) == 2, held
    assert "holding the job until the spool takes it" in chain.worker.log()
    filler.unlink()
    chain.wait_idle()
    retried = send_all(chain, later, sessions=1)
    assert all(s.accepted for s in retried), [s.tries for s in retried]
    chain.wait_idle()

    tally = chain.account(accepted(early) | accepted(retried))
    failures = sample(chain.milter_metrics(), "mxrules_spool_write_failures_total")
    report("spool-full", tally, answered_451=len(refused), spool_write_failures=int(failures))
    assert tally.lost == set() and tally.strangers == set()
    assert sum(tally.landed.values()) == 5 and tally.duplicates == 0
    assert len(chain.moto.s3_keys("mail-bucket", "copy/")) == 5
    assert failures == 3
    assert sample(chain.milter_metrics(), "mxrules_milter_errors_total", stage="eom") == 0
    assert chain.counts()["failed"] == 0


# -- 5 ----------------------------------------------------------------------------------------

def test_broken_config_reload_during_traffic_rejects_nothing(make_chain: MakeChain) -> None:
    """A broken config written over the good one while mail flows, then the good one back:
    every message is accepted at the first try and stored; the failed reload is counted."""
    chain = make_chain(milter={"reload_interval": 0.2})
    messages = [mail("reload", i) for i in range(80)]
    progress = Progress()
    sending = in_background(lambda: send_all(chain, messages, sessions=2, progress=progress,
                                             pause=0.02))
    progress.wait_for(10)
    milter_at, worker_at = len(chain.milter.log()), len(chain.worker.log())
    # Written in place, as an editor would, not renamed: the watcher may read it half-done.
    chain.config_path.write_text("domains: [example.com\nrule_sets: {default: [\n")
    chain.milter.signal(signal.SIGUSR1)
    chain.worker.signal(signal.SIGUSR1)
    chain.milter.wait_for_log(r"reload rejected", after=milter_at)
    chain.worker.wait_for_log(r"config reload refused", after=worker_at)
    broken_at = progress.value
    progress.wait_for(broken_at + 15)  # mail keeps flowing under the old config
    while_broken = progress.value - broken_at
    milter_at, worker_at = len(chain.milter.log()), len(chain.worker.log())
    chain.rewrite_config()
    chain.milter.signal(signal.SIGUSR1)
    chain.worker.signal(signal.SIGUSR1)
    chain.milter.wait_for_log(r"config reloaded", after=milter_at)
    chain.worker.wait_for_log(r"config reloaded", after=worker_at)
    sent = sending()

    assert all(len(s.tries) == 1 and s.accepted for s in sent), \
        [s.tries for s in sent if not s.accepted][:3]
    chain.wait_idle()
    tally = chain.account(accepted(sent))
    metrics = chain.milter_metrics()
    failed = sample(metrics, "mxrules_config_reloads_total", result="failed")
    report("broken-reload", tally, accepted_while_broken=while_broken,
           reloads_failed=int(failed))
    assert tally.lost == set() and tally.strangers == set()
    assert sum(tally.landed.values()) == 80 and tally.duplicates == 0
    assert failed >= 1
    assert sample(metrics, "mxrules_config_reloads_total", result="ok") >= 1
    assert sample(metrics, "mxrules_config_last_reload_successful") == 1


# -- 6 ----------------------------------------------------------------------------------------

def test_postfix_restarted_mid_traffic(make_chain: MakeChain) -> None:
    """Postfix stopped and started, then reloaded, under 4 sessions: every 250 is stored;
    what met a dropped or refused connection is sent again by the client and stored.

    A session cut after the milter committed its job but before the client read 250 is
    stored twice once resent; at most one per session in flight at the stop.
    """
    sessions = 4
    chain = make_chain()
    messages = [mail("postfix-restart", i) for i in range(150)]
    progress = Progress()
    sending = in_background(lambda: send_all(chain, messages, sessions=sessions,
                                             progress=progress, resend_for=60))
    progress.wait_for(40)
    chain.postfix.stop()
    chain.postfix.start()
    progress.wait_for(100)
    chain.postfix.reload()
    sent = sending()

    assert all(s.accepted for s in sent), [s.tries for s in sent if not s.accepted][:3]
    resent = sum(len(s.tries) > 1 for s in sent)
    uncertain = sum(s.uncertain for s in sent)
    chain.wait_idle()
    tally = chain.account(accepted(sent))
    cut = sorted({f"{r.data[0]} {r.data[1][:60]}" for s in sent for r in s.tries
                  if r.data is not None and r.data[0] != 250})
    report("postfix-restart", tally, resent=resent, uncertain=uncertain, cut_at_data=cut)
    assert resent >= 1  # the restart did hit traffic
    assert tally.lost == set() and tally.strangers == set()
    assert tally.extra_objects <= uncertain, tally.summary()
    assert tally.extra_objects <= sessions, tally.summary()
    assert tally.repeated_puts == 0
    assert chain.counts()["failed"] == 0



# -- recovery ---------------------------------------------------------------------------------

def test_backlog_is_retried_as_soon_as_aws_is_back(make_chain: MakeChain,
                                                   aws_proxy: AwsProxy) -> None:
    """After an outage the backlog drains when the endpoint is back, not when each
    job's backoff comes due: the first retry that succeeds wakes the others."""
    chain = make_chain(endpoint_url=aws_proxy.url,
                       worker={"retry_initial_delay": 1, "retry_max_delay": 300})
    early = send_all(chain, [mail("early", i) for i in range(4)])
    assert all(s.accepted for s in early)

    def progress(state: str = "deferred") -> dict[str, Any]:
        out = {}
        for job_id in chain.spool.ids(state):
            try:
                out[job_id] = chain.spool.load(state, job_id).progress
            except Exception:  # being moved by the worker right now
                continue
        return out

    # Five refused attempts each (retried after 0.5-1, 1-2, 2-4, 4-8 s): the next
    # attempts are due 8-16 s later.
    wait_until(lambda: len(progress()) == 4 and all(p.attempts >= 5 for p in progress().values()),
         "four jobs deferred after five refused attempts", timeout=60)
    early_due = min(p.next_due for p in progress().values())
    late = send_all(chain, [mail("late", 0)])
    assert late[0].accepted
    wait_until(lambda: len(progress()) == 5, "the late job deferred")
    late_due = min(p.next_due for p in progress().values())
    assert early_due - late_due > 2, "the early jobs' backoff is too short to tell"

    aws_proxy.set_mode("forward")
    chain.wait_idle()
    drained = time.time()
    tally = chain.account(accepted(early + late))
    report("aws-recovery", tally, drained_before_due_s=round(early_due - drained, 1))
    assert tally.lost == set() and tally.duplicates == 0
    assert sum(tally.landed.values()) == 5
    # Done before any early job's own retry was due: woken by the late job's success.
    assert drained < early_due, (drained, early_due)
    assert "retried S3 action succeeded" in chain.worker.log()
