"""The spool: the one contract between the milter and the worker.

Modelled on Postfix's queue: one directory per state, a job moves between
states by rename(2), data is fsync'd before the hand-off, and damaged jobs are
moved aside, never deleted.

    tmp/        jobs being received (the milter's; never read by a worker)
    done/       finished jobs on their way out (removed right after the rename)
    incoming/   committed jobs waiting for a worker
    active/     jobs a worker has claimed
    deferred/   jobs waiting for a retry
    failed/     dead letters, kept until an operator acts
    corrupt/    jobs that cannot be decoded

A job is a directory named by its messageId holding `message` (the raw message
exactly as received, CRLF line ends) and `job.json` (everything else: the
envelope, client facts, verdicts, the matched rules and their recipients, the
headers added in-stream, progress).  The message file is written once; the
small job.json is the part that changes, always by write-fsync-rename.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import CorruptJobError, SpoolError
from .ids import is_message_id
from .job import (
    JOB_VERSION,
    Client,
    Job,
    MatchedRule,
    Progress,
    ses_timestamp,
    to_json,
    with_progress,
)
from .jobstate import requeued

# The job record is mxrules.job's; these names stay importable from here.
__all__ = [
    "ACTIVE",
    "CORRUPT",
    "DEFERRED",
    "DIRECTORIES",
    "DONE",
    "FAILED",
    "INCOMING",
    "JOB_VERSION",
    "META",
    "STATES",
    "TMP",
    "Claim",
    "Client",
    "DeadLetter",
    "Job",
    "JobWriter",
    "MatchedRule",
    "Progress",
    "Spool",
    "message_time",
    "retention_victims",
    "ses_timestamp",
    "to_json",
    "with_progress",
]

# The states, one directory each, named once here (as Postfix's mail_queue.h names its
# queues); only this module touches the directories, the others pass these names.
TMP = "tmp"  # being received by the milter; never read by a worker
INCOMING = "incoming"
ACTIVE = "active"
DEFERRED = "deferred"
FAILED = "failed"
CORRUPT = "corrupt"
DONE = "done"  # finished, being removed
# The states a job waits in: listed by `mxrules spool list`, counted by the metrics.
STATES = (INCOMING, ACTIVE, DEFERRED, FAILED, CORRUPT)
# Every state directory the spool has (tmp/ and done/ are passages, not waits).
DIRECTORIES = (TMP, *STATES, DONE)
MESSAGE = "message"
META = "job.json"
LOCK = "lock"


def _remove_job_dir(path: str) -> None:
    """Remove a job directory from done/: its files, then itself.

    A job holds a few plain files, so this is a listing, an unlink each and an rmdir
    (shutil.rmtree costs several system calls more per entry); anything unexpected,
    such as a subdirectory, falls back to rmtree.  Leftovers are cleaned at start.
    """
    try:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


# Spool files are never opened through a symbolic link.  The spool belongs to the
# mxrules user; a link planted there must not lead a process with other rights
# (root running `mxrules spool`, before it switches to the spool's owner) to
# read or write a file elsewhere.  O_NONBLOCK: a FIFO planted as job.json must
# not hang its reader (it is then refused as not a regular file).
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _create(path: str) -> BinaryIO:
    """A new file at `path` for writing; whatever is there already (a link too) is refused."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    return os.fdopen(fd, "wb")


def _read_job_file(path: str, job_id: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except FileNotFoundError:
        raise CorruptJobError(job_id, "job.json is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptJobError(job_id, "job.json is a symbolic link") from None
        raise SpoolError(f"cannot read job {job_id}: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptJobError(job_id, "job.json is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise SpoolError(f"cannot read job {job_id}: {exc}") from exc
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SharedDirSync:
    """fsync of one directory, shared by the commits that need it at the same time.

    A commit needs its rename in the directory durable before Postfix may
    answer 250, and any fsync of the directory that starts after the rename
    makes it so.  Under load many milter threads commit at once: each takes a
    ticket after its rename; one of them runs the fsync for every ticket taken
    before it started, and the others wait for it instead of queueing fsyncs
    of their own.  A ticket that the running fsync does not cover (taken after
    it started) gets the next one.  A failed fsync covers nothing: a waiter
    then runs its own and gets its own error.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._tickets = 0  # handed out so far
        self._durable = 0  # every ticket up to this one is covered by a completed fsync
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._tickets += 1
            ticket = self._tickets
            while self._running and self._durable < ticket:
                self._cond.wait()
            if self._durable >= ticket:
                return
            self._running = True
            covers = self._tickets  # every rename before this instant
        done = False
        try:
            _fsync_dir(self.path)
            done = True
        finally:
            with self._cond:
                self._running = False
                if done:
                    self._durable = max(self._durable, covers)
                self._cond.notify_all()


class JobWriter:
    """One message being received: streamed to tmp/, committed by rename.

    Memory stays flat whatever the message size: chunks go straight to the
    file, and the hash and size are computed as they pass.
    """

    def __init__(self, spool: Spool, message_id: str) -> None:
        self.spool = spool
        self.message_id = message_id
        self.dir = os.path.join(spool.root, TMP, message_id)
        self.size = 0
        self._hash = hashlib.sha256()
        # The session's thread writes and commits; the stopping milter's main
        # thread may drop the reception (`abandon`) at any moment: never in the
        # middle of a commit, and never once it is committed.
        self._lock = threading.Lock()
        self._open = True  # until committed or dropped
        os.mkdir(self.dir, 0o700)
        try:
            self._fh = _create(os.path.join(self.dir, MESSAGE))
        except OSError:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def write(self, data: bytes) -> None:
        with self._lock:
            self._check_open()
            self._fh.write(data)
            self._hash.update(data)
            self.size += len(data)

    def _check_open(self) -> None:
        if not self._open:
            raise OSError(errno.ECANCELED, f"reception {self.message_id} was dropped "
                          "(the milter is stopping)")

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def message_path(self) -> str:
        return os.path.join(self.dir, MESSAGE)

    def flush(self) -> None:
        """Make what was written readable by other processes (the scanners)."""
        with self._lock:
            self._check_open()
            self._fh.flush()

    def commit(self, job: Job) -> str:
        """Make the job durable and visible to workers; returns its path.

        Order matters: file data, then job.json, then the job directory, then
        the rename into incoming/ and the fsync of both parent directories.
        Only after all of them may Postfix answer 250.
        """
        with self._lock:
            if not self._open:
                raise SpoolError(f"cannot commit job {self.message_id}: the reception was "
                                 "dropped (the milter is stopping)")
            try:
                return self._commit(job)
            finally:
                # Committed, dropped, or (a failed fsync) perhaps in incoming/ all
                # the same: from here on it is never written or removed.
                self._open = False
                self.spool.received(self)

    def _commit(self, job: Job) -> str:
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            meta = os.path.join(self.dir, META)
            with _create(meta) as fh:
                fh.write(job.encode())
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(self.dir)
            target = os.path.join(self.spool.root, INCOMING, self.message_id)
            os.rename(self.dir, target)
        except (OSError, ValueError) as exc:  # ValueError: a job.json that cannot be encoded
            self._discard()
            raise SpoolError(f"cannot commit job {self.message_id}: {exc}") from exc
        return self._make_durable(target)

    def _make_durable(self, target: str) -> str:
        """fsync the rename into incoming/; if that fails, take the job back.

        A worker may see the job from the rename on: failing the commit while
        leaving the job there would answer 451 for a message that still runs,
        and the client's retry would run it twice.  Taken back into tmp/, it
        is gone for good; if a worker already took it into active/, it runs,
        and the commit stands.
        """
        try:
            self.spool.dir_sync(INCOMING)
        except OSError as exc:
            try:
                os.rename(target, self.dir)
            except FileNotFoundError:
                return target  # a worker has it: answering 451 now would duplicate it
            except OSError:
                pass  # neither durable nor taken back: the job may run; 451 all the same
            else:
                self._discard()
            raise SpoolError(f"cannot commit job {self.message_id}: {exc}") from exc
        # The job is durable in incoming/.  Should the old name in tmp/ come back
        # after a crash, the janitor removes it (clean_tmp): nothing to fail on.
        with contextlib.suppress(OSError):
            self.spool.dir_sync(TMP)
        return target

    def abort(self) -> None:
        """Forget a message that will not be accepted (or whose commit failed).

        On a full disk close() fails too, flushing what is still buffered (the
        file is closed all the same): that data is being thrown away anyway, and
        the reception must still leave tmp/ now, not at the janitor's next pass.
        """
        with self._lock:
            self._discard()

    def abandon(self) -> bool:
        """Drop the reception unless it is committed: False if it was (waits for a commit
        in progress, which is then whole in incoming/)."""
        with self._lock:
            if not self._open:
                return False
            self._discard()
            return True

    def _discard(self) -> None:
        """abort() with the lock held; nothing once committed or dropped."""
        if not self._open:
            return
        self._open = False
        if not self._fh.closed:
            with contextlib.suppress(OSError):
                self._fh.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.spool.received(self)


class Spool:
    def __init__(self, root: str) -> None:
        self.root = root
        self._dir_syncs = {d: _SharedDirSync(os.path.join(root, d)) for d in (INCOMING, TMP)}
        # The receptions in tmp/ that this process has open, for stop_receiving().
        self._receiving: set[JobWriter] = set()
        self._receiving_lock = threading.Lock()
        self._stopped = False

    def dir_sync(self, name: str) -> None:
        """Make the renames already done in incoming/ or tmp/ durable (an fsync, shared)."""
        self._dir_syncs[name].sync()

    def ensure(self) -> None:
        """Create the state directories (again, if an operator removed them).

        The milter calls this for every message, so a directory that is there
        costs one stat: makedirs would try a mkdir, which takes the parent's
        lock and fails, and look again.
        """
        for path in (self.root,
                     *(os.path.join(self.root, s) for s in DIRECTORIES)):
            if not os.path.isdir(path):
                os.makedirs(path, mode=0o700, exist_ok=True)

    def new_job(self, message_id: str) -> JobWriter:
        try:
            self.ensure()
            writer = JobWriter(self, message_id)
        except OSError as exc:
            raise SpoolError(f"cannot create job {message_id} in {self.root}: {exc}") from exc
        with self._receiving_lock:
            if not self._stopped:
                self._receiving.add(writer)
                return writer
        writer.abort()
        raise SpoolError(f"cannot create job {message_id}: the milter is stopping")

    def received(self, writer: JobWriter) -> None:
        """`writer` is committed or dropped: no longer a reception in progress."""
        with self._receiving_lock:
            self._receiving.discard(writer)

    def stop_receiving(self) -> int:
        """Refuse new receptions and drop those in progress; returns how many were dropped.

        For a stopping milter: a message still in DATA will not be answered
        (Postfix answers it 4xx when the connection goes), so its reception
        leaves tmp/ now.  A commit in progress finishes first and stands.
        """
        with self._receiving_lock:
            self._stopped = True
            writers = list(self._receiving)
        return sum(writer.abandon() for writer in writers)

    def path(self, state: str, job_id: str) -> str:
        return os.path.join(self.root, state, job_id)

    def ids(self, state: str) -> list[str]:
        try:
            names = os.listdir(os.path.join(self.root, state))
        except FileNotFoundError:
            return []
        except OSError as exc:  # not a directory, no permission: the spool is unusable
            raise SpoolError(f"cannot list {state}/ in {self.root}: {exc}") from exc
        return sorted(n for n in names if is_message_id(n))

    def find(self, job_id: str) -> str | None:
        """The state a job is in, or None."""
        for state in STATES:
            if os.path.isdir(self.path(state, job_id)):
                return state
        return None

    def load(self, state: str, job_id: str) -> Job:
        raw = _read_job_file(os.path.join(self.path(state, job_id), META), job_id)
        job = Job.decode(raw, job_id)
        if job.message_id != job_id:
            # The worker saves progress by the job's own id: it must be its directory's.
            raise CorruptJobError(job_id, f"job.json is for message {job.message_id!r}")
        return job

    def message_path(self, state: str, job_id: str) -> str:
        return os.path.join(self.path(state, job_id), MESSAGE)

    def jobs(self, state: str) -> Iterator[tuple[str, Job | CorruptJobError]]:
        for job_id in self.ids(state):
            try:
                job: Job | CorruptJobError = self.load(state, job_id)
            except CorruptJobError as exc:
                if not os.path.isdir(self.path(state, job_id)):
                    continue  # moved on (a worker took it) since the listing: not damaged
                job = exc
            yield job_id, job

    def clean_done(self) -> int:
        """Remove finished jobs a worker did not get to delete (killed meanwhile)."""
        names = self.ids(DONE)
        for name in names:
            shutil.rmtree(os.path.join(self.root, DONE, name), ignore_errors=True)
        return len(names)

    def clean_tmp(self, older_than: float, now: float) -> int:
        """Remove receptions abandoned by a milter that died mid-DATA."""
        removed = 0
        for name in self.ids(TMP):
            path = os.path.join(self.root, TMP, name)
            try:
                # The directory's mtime does not move while its message file
                # grows: a slow reception is judged by its newest file.
                newest = max([os.stat(path).st_mtime] + [
                    os.stat(os.path.join(path, f)).st_mtime for f in os.listdir(path)])
                if now - newest > older_than:
                    shutil.rmtree(path)
                    removed += 1
            except OSError:
                continue
        return removed


    # -- the worker's side ---------------------------------------------------
    def claim(self, state: str, job_id: str) -> Claim | None:
        """Take a job for this process, or None if another worker holds it.

        Mutual exclusion is an flock(2) on the job's own `lock` file, taken
        before the job is moved into active/: whoever holds the lock owns the
        job, the lock follows the directory through renames, and the kernel
        drops it when the owner dies -- so a job left in active/ by a dead
        worker is simply claimed again (its in-flight action may run twice).
        """
        directory = self.path(state, job_id)
        try:
            fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            return None  # taken and finished or moved by another worker meanwhile
        except OSError as exc:  # ELOOP: a link planted as the lock; EACCES: not the owner's
            raise SpoolError(f"cannot open lock of job {job_id}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if state != ACTIVE:
                os.rename(directory, self.path(ACTIVE, job_id))
        except FileNotFoundError:
            os.close(fd)  # moved by its previous owner just before we locked it
            return None
        except OSError as exc:
            os.close(fd)
            raise SpoolError(f"cannot claim job {job_id}: {exc}") from exc
        try:
            job = self.load(ACTIVE, job_id)
        except CorruptJobError:
            try:
                self.move(job_id, ACTIVE, CORRUPT)  # kept for an operator, never deleted
            finally:
                os.close(fd)
            raise
        except BaseException:
            os.close(fd)  # not held by an error: the next look tries again
            raise
        return Claim(self, job_id, fd, job)

    def move(self, job_id: str, src: str, dst: str) -> None:
        os.rename(self.path(src, job_id), self.path(dst, job_id))
        _fsync_dir(os.path.join(self.root, dst))

    def save(self, state: str, job: Job) -> None:
        """Replace a job's job.json atomically (write, fsync, rename, fsync dir)."""
        directory = self.path(state, job.message_id)
        tmp = os.path.join(directory, META + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a crash, or planted: replaced, never written through
        with _create(tmp) as fh:
            fh.write(job.encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, os.path.join(directory, META))
        _fsync_dir(directory)

    def requeue(self, job_id: str) -> Job:
        """Give a dead letter (or a deferred job) another full retry window, now."""
        state = self.find(job_id)
        if state not in (FAILED, DEFERRED):
            raise SpoolError(f"job {job_id} is {state or 'not in the spool'}, "
                             "only failed or deferred jobs can be requeued")
        claim = self.claim(state, job_id)
        if claim is None:
            raise SpoolError(f"job {job_id} is held by a worker")
        job = requeued(claim.job, dead_letter=state == FAILED)
        try:
            claim.save(job)
            claim.move(INCOMING)
        except OSError as exc:
            claim.release()
            raise SpoolError(f"cannot requeue job {job_id}: {exc}") from exc
        return job

    def delete(self, job_id: str) -> str:
        """Remove a job for good (an operator's decision); returns the state it was in."""
        state = self.find(job_id)
        if state is None:
            raise SpoolError(f"no job {job_id} in the spool")
        try:
            if state != CORRUPT:
                claim = self.claim(state, job_id)
                if claim is None:
                    raise SpoolError(f"job {job_id} is held by a worker")
                claim.finish()
            else:
                shutil.rmtree(self.path(state, job_id))
        except OSError as exc:
            raise SpoolError(f"cannot delete job {job_id}: {exc}") from exc
        return state


    # -- dead letters' retention -----------------------------------------------------
    def dead_letters(self) -> list[DeadLetter]:
        """The jobs in failed/, oldest first: when each was given up on, and its size."""
        letters = []
        for job_id in self.ids(FAILED):
            path = self.path(FAILED, job_id)
            try:
                # job.json is saved just before the move to failed/: its time is the
                # dead-lettering's (a rename leaves the directory's own times alone).
                since = _mtime(os.path.join(path, META), path)
                size = sum(entry.stat(follow_symlinks=False).st_size
                           for entry in os.scandir(path) if not entry.is_dir())
            except OSError:
                continue  # requeued, deleted or removed meanwhile
            letters.append(DeadLetter(job_id, since, size))
        return sorted(letters, key=lambda letter: (letter.since, letter.job_id))

    def remove_dead_letter(self, job_id: str) -> bool:
        """Remove a job from failed/ for good; False if it is held or already gone.

        The job's lock is taken first, as for any claim, so a job an operator is
        requeueing at that moment is never removed; it leaves failed/ by one rename
        into done/, never into active/, where a worker would run it again.
        """
        directory = self.path(FAILED, job_id)
        try:
            fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise SpoolError(f"cannot open lock of job {job_id}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            target = os.path.join(self.root, DONE, job_id)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            os.rename(directory, target)
        except (BlockingIOError, FileNotFoundError):
            return False
        except OSError as exc:
            raise SpoolError(f"cannot remove dead letter {job_id}: {exc}") from exc
        finally:
            os.close(fd)
        _fsync_dir(os.path.join(self.root, FAILED))
        _remove_job_dir(target)
        return True


@dataclass(frozen=True)
class DeadLetter:
    job_id: str
    since: float  # when it was moved to failed/ (Unix time)
    size: int  # bytes of its files


def retention_victims(letters: list[DeadLetter], max_age: float, max_size: int,
                      now: float) -> list[tuple[DeadLetter, str]]:
    """The dead letters retention removes, oldest first, each with why ("age" or "size").

    First every one older than `max_age` seconds, then the oldest of the rest until
    the others together take at most `max_size` bytes.  0 turns a limit off.
    """
    ordered = sorted(letters, key=lambda letter: (letter.since, letter.job_id))
    victims = [(letter, "age") for letter in ordered if max_age and now - letter.since > max_age]
    kept = ordered[len(victims):]
    total = sum(letter.size for letter in kept)
    for letter in kept:
        if not max_size or total <= max_size:
            break
        victims.append((letter, "size"))
        total -= letter.size
    return victims


def _mtime(path: str, fallback: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return os.lstat(fallback).st_mtime


class Claim:
    """A job held by this process: it sits in active/ and its lock is ours."""

    def __init__(self, spool: Spool, job_id: str, fd: int, job: Job) -> None:
        self.spool = spool
        self.job_id = job_id
        self.fd = fd
        self.state = ACTIVE
        self.job = job

    @property
    def message_path(self) -> str:
        return self.spool.message_path(self.state, self.job_id)

    def save(self, job: Job) -> None:
        self.spool.save(self.state, job)
        self.job = job

    def move(self, state: str) -> None:
        """Hand the job to another state and let go of it."""
        try:
            self.spool.move(self.job_id, self.state, state)
            self.state = state
        finally:
            self.release()

    def finish(self, job: Job | None = None) -> None:
        """Every action is done: the job leaves the spool.

        One rename takes it out of its state (a worker killed while deleting
        must not leave a half-deleted job behind, which would look corrupt);
        the files are removed from done/ afterwards, and leftovers there are
        cleaned at the next start.  `job`, the job as it stands (the worker
        does not save the progress of its last action, which this records),
        is saved if the job cannot leave its state, before the lock goes; if
        that save fails too, the job stays held (the OSError says why) for the
        caller to save it, lest the next claim run the last action again.
        """
        done = os.path.join(self.spool.root, DONE)
        target = os.path.join(done, self.job_id)
        try:
            os.makedirs(done, mode=0o700, exist_ok=True)
            os.rename(self.spool.path(self.state, self.job_id), target)
        except OSError:
            if job is not None:
                self.save(job)  # raises with the job still held
            self.release()
            raise
        try:
            _fsync_dir(os.path.join(self.spool.root, self.state))
            _remove_job_dir(target)
        finally:
            self.release()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def message_time(job_id: str) -> float:
    """When a job was received, from the time prefix of its messageId (Unix time)."""
    raw = base64.b32hexdecode(job_id.upper().encode("ascii"))
    return int.from_bytes(raw[:8], "big") / 1e9
