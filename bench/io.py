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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, IO, Iterator

from bench.errors import UserError

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


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def exclusive(lock: str | Path, what: str) -> Iterator[None]:
    """Hold the lock file `lock` for the block; another process asking for it waits until it is released
    (saying once, on stderr, that it waits for `what`). The kernel releases the lock of a process that dies,
    killed or not, so no stale lock is ever left to take over; the file itself is deleted on release. Works
    across machines on a file system with working flock (NFS v4, Lustre mounted with -o flock)."""
    lock = Path(lock)
    if fcntl is None:
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(lock, exc) from None
    announced = False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise unwritable(lock, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not announced:
                print(f"bench: {what} is being done by {_holder(fd)}; waiting for it", file=sys.stderr, flush=True)
                announced = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        try:  # the holder before us deletes the file on release: a lock on a deleted file locks nothing
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST,
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
