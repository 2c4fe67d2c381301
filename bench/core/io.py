"""Files that several processes share: atomic writes (a reader, or a process killed mid-write, never sees half a
file), the removal of what a killed write left behind, locks that make two processes do one piece of work
once, and one clear error when a destination cannot be written."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

from bench.core.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one process per results folder there
    fcntl = None

HOST = socket.gethostname()
# a temporary file names its writer, so a later process can tell one left by a killed writer from one in use
_TEMPORARY = re.compile(r"^\.(?P<name>.+)~(?P<host>[^~]*)~(?P<pid>\d+)~[0-9a-f]+\.tmp$")
_LEGACY_TEMPORARY = re.compile(r"^\..+\.tmp$")  # written before temporaries named their writer
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class UnwritableDestination(UserError):
    """A file could not be written: a read-only folder, a full disk, a quota. Nothing already written is lost,
    since every write replaces its file only once it is complete."""


def unwritable(path: str | Path, exc: OSError) -> UnwritableDestination:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space there (or point the results or cache folder elsewhere) and re-run to continue"
    else:
        hint = "choose a writable folder"
    return UnwritableDestination(f"cannot write {path} ({reason}); {hint}")


class _WriteErrors:
    """A file object that keeps the OSError of a failed write: torch.save reports a full disk as a RuntimeError
    ('unexpected pos') that no longer says why."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self.fh, name)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}~{HOST}~{os.getpid()}~{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(tmp, "wb")
    except OSError as exc:
        raise unwritable(path, exc) from None
    sink = _WriteErrors(fh)
    try:
        with fh:
            write(sink)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if sink.error is not None:
            raise unwritable(path, sink.error) from None
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:  # from flush, fsync or the rename
            raise unwritable(path, exc) from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, locked: bool = False) -> list[Path]:
    """Delete the temporary files in `folder` that killed writes left: those whose writer (named in the file's
    name) is a dead process of this machine; with `locked` (the caller holds the folder's lock, so nobody else
    writes there) every temporary file not of this process. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if m:
            ours = m["host"] == HOST and int(m["pid"]) == os.getpid()
            dead = m["host"] == HOST and not process_alive(int(m["pid"]))
            stale = (locked and not ours) or dead
        else:
            stale = locked and bool(_LEGACY_TEMPORARY.match(entry.name))
        if stale and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


# flock's answers where a file system does not do advisory locks (Lustre without -o flock, some NFS mounts)
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_warned_no_locks = False


class FileLock:
    """An exclusive advisory lock (flock) on the file `path`, for work that two processes must not both do.

    The kernel releases the lock of a process that ends, killed or not, so no stale lock is ever left to take
    over. The file itself stays (deleting it would let a process lock a file that is no longer there, which
    NFS's cached names make possible); it holds the last holder's pid, host and start time, for the message a
    waiting process prints once. Works across machines where the file system does flock (NFS v4, Lustre with
    -o flock); where it does not, a warning says so and nothing is locked."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        self.fd: int | None = None
        self.announced = False

    def try_acquire(self) -> bool:
        """Take the lock if it is free (True); else say once who holds it and return False."""
        global _warned_no_locks
        if fcntl is None:
            return True
        if self.fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise unwritable(self.path, exc) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self.announced:
                print(f"bench: {self.what} is being done by {self._holder()}; waiting for it", file=sys.stderr,
                      flush=True)
                self.announced = True
            return False
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise
            if not _warned_no_locks:
                print(f"bench: the file system of {self.path.parent} has no file locks ({exc.strerror}); two "
                      f"processes given the same work will both do it", file=sys.stderr)
                _warned_no_locks = True
            return True
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": HOST,
                                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        return True

    def acquire(self) -> None:
        """Take the lock, waiting for its holder if there is one."""
        while not self.try_acquire():
            time.sleep(0.5)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases its lock
            self.fd = None

    def _holder(self) -> str:
        try:
            info = json.loads(os.pread(self.fd, 4096, 0) or b"{}")
            return f"process {info['pid']} on {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
