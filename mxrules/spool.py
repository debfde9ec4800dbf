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
import fcntl
import os
import shutil
import threading
from collections.abc import Iterator

from . import spool_files as files
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
from .retention import DeadLetter, retention_victims
from .spool_files import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    DIRECTORIES,
    DONE,
    FAILED,
    INCOMING,
    MESSAGE,
    META,
    STATES,
    TMP,
)
from .spool_writer import JobWriter

# The job record is mxrules.job's, the names of states and files mxrules.spool_files',
# the reception mxrules.spool_writer's; these names stay importable from here.
__all__ = ["ACTIVE", "CORRUPT", "DEFERRED", "DIRECTORIES", "DONE", "FAILED", "INCOMING",
           "JOB_VERSION", "META", "STATES", "TMP", "Claim", "Client", "DeadLetter", "Job",
           "JobWriter", "MatchedRule", "Progress", "Spool", "message_time", "retention_victims",
           "ses_timestamp", "to_json", "with_progress"]


class Spool:
    def __init__(self, root: str) -> None:
        self.root = root
        self._dir_syncs = {d: files.SharedDirSync(os.path.join(root, d)) for d in (INCOMING, TMP)}
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
        raw = files.read_job_file(os.path.join(self.path(state, job_id), META), job_id)
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
        fd = files.open_lock(directory, job_id)
        if fd is None:
            return None  # taken and finished or moved by another worker meanwhile
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
        files.fsync_dir(os.path.join(self.root, dst))

    def save(self, state: str, job: Job) -> None:
        """Replace a job's job.json atomically (write, fsync, rename, fsync dir)."""
        directory = self.path(state, job.message_id)
        tmp = os.path.join(directory, META + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a crash, or planted: replaced, never written through
        with files.create(tmp) as fh:
            fh.write(job.encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, os.path.join(directory, META))
        files.fsync_dir(directory)

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
                since = files.mtime(os.path.join(path, META), path)
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
        fd = files.open_lock(directory, job_id)
        if fd is None:
            return False
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
        files.fsync_dir(os.path.join(self.root, FAILED))
        files.remove_job_dir(target)
        return True


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
            files.fsync_dir(os.path.join(self.spool.root, self.state))
            files.remove_job_dir(target)
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
