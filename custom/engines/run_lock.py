"""One training run per checkpoint folder: a second run on the same ``ckpt_dir`` is refused, naming the first.

Two runs writing one ``ckpt_dir`` both finish with exit status 0 and the last writer wins: the
checkpoint and ``model.pt`` then mix two runs. :class:`RunLock` takes an exclusive ``flock`` on
``<ckpt_dir>/.lock`` and keeps the file open for the life of the process; the kernel releases the
lock when the process ends in any way (``kill -9`` included), so a killed run never leaves it stuck.
The file holds the holder's host, PID and start time, for the refusal message. MONAI has no such
lock (its ``CheckpointSaver`` overwrites), hence this module.

Under ``torchrun`` the ranks of one run share ``ckpt_dir``: only global rank 0 takes the lock (on
every node the others skip it), so a run never refuses its own ranks and two nodes on a shared
filesystem hold one lock, not one each.

``flock`` on NFS: Linux emulates it with NFS byte-range locks (NFSv4, or v3 with lockd), which work
across clients; a mount with ``nolock`` or ``local_lock=all`` keeps the lock local to one machine,
and two runs on different machines are then not kept apart.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

__all__ = ["RunLock", "RunLockedError"]

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live training run holds the checkpoint folder; the message names its host and PID."""


def _global_rank() -> int:
    """This process's global rank: from ``torch.distributed`` when initialised, else ``RANK`` (torchrun), else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class RunLock:
    """Exclusive lock on ``<ckpt_dir>/.lock`` for the life of this process (global rank 0 only).

    Use it first in a ``training`` run list: ``"$@run_lock.acquire()"``.

    Args:
        ckpt_dir: the run's checkpoint folder (created if missing).

    Raises:
        RunLockedError: from :meth:`acquire`, when another live process holds the lock.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> lock = RunLock(d).acquire()
        >>> RunLock(d).holder()["pid"] == os.getpid()
        True
        >>> lock.release()
    """

    def __init__(self, ckpt_dir: str | os.PathLike) -> None:
        self.path = Path(ckpt_dir) / LOCK_NAME
        self._file = None
        self._created_dir = False

    def holder(self) -> dict:
        """What the lock file says about its holder (host, pid, started); empty when unreadable or empty."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        """Take the lock (rank 0) or do nothing (other ranks); returns ``self``.

        Raises:
            RunLockedError: another live process holds it.
        """
        if self._file is not None or _global_rank() != 0:
            return self
        self._created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.close()
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                who = self.holder()
                raise RunLockedError(
                    f"{self.path.parent}: another training run is using this checkpoint folder (host "
                    f"{who.get('host', 'unknown')}, PID {who.get('pid', 'unknown')}, started "
                    f"{who.get('started', 'unknown')}; lock file {self.path}). Two runs on one ckpt_dir would "
                    "overwrite each other's checkpoints: wait for it to end, or give this run another --ckpt_dir."
                ) from None
            try:  # the holder may have removed the file between our open and our lock: lock the file now there
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}) + "\n")
            f.flush()
        except OSError:  # a full disk: the lock holds all the same; a refused run then says "unknown"
            pass
        self._file = f
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Remove the lock file and let the lock go (also at interpreter exit); the kernel does it on a kill."""
        if self._file is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._file.close()  # closing the descriptor releases the flock
        self._file = None
        if self._created_dir:
            try:  # a run that stopped before writing anything (preflight refused the data) leaves no folder
                self.path.parent.rmdir()
            except OSError:  # not empty: this run wrote into it
                pass
