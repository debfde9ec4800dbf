"""A message being received: streamed into tmp/, committed to incoming/ by rename.

The milter's side of the spool: nothing is in incoming/ -- where a worker may
take it -- before its message, its job.json and both directories are durable.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import threading
from typing import TYPE_CHECKING

from . import spool_files as files
from .errors import SpoolError
from .job import Job

if TYPE_CHECKING:
    from .spool import Spool


class JobWriter:
    """One message being received: streamed to tmp/, committed by rename.

    Memory stays flat whatever the message size: chunks go straight to the
    file, and the hash and size are computed as they pass.
    """

    def __init__(self, spool: Spool, message_id: str) -> None:
        self.spool = spool
        self.message_id = message_id
        self.dir = os.path.join(spool.root, files.TMP, message_id)
        self.size = 0
        self._hash = hashlib.sha256()
        # The session's thread writes and commits; the stopping milter's main
        # thread may drop the reception (`abandon`) at any moment: never in the
        # middle of a commit, and never once it is committed.
        self._lock = threading.Lock()
        self._open = True  # until committed or dropped
        os.mkdir(self.dir, 0o700)
        try:
            self._fh = files.create(os.path.join(self.dir, files.MESSAGE))
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
        return os.path.join(self.dir, files.MESSAGE)

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
            meta = os.path.join(self.dir, files.META)
            with files.create(meta) as fh:
                fh.write(job.encode())
                fh.flush()
                os.fsync(fh.fileno())
            files.fsync_dir(self.dir)
            target = os.path.join(self.spool.root, files.INCOMING, self.message_id)
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
            self.spool.dir_sync(files.INCOMING)
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
            self.spool.dir_sync(files.TMP)
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
