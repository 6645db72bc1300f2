"""Files that appear whole or not at all, with the permissions any other tool would give them.

`tempfile` creates files 0600 and folders 0700, which would keep a shared cluster group from reading
an export; what we write is given the mode the process's umask allows, as `open` and `mkdir` do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dreambooth_pl.util.config import ConfigError

log = logging.getLogger(__name__)


class DiskFull(ConfigError, OSError):
    """A write that ran out of space; nothing partial was kept (the temporary file or folder is removed)."""

    def __init__(self, path: str | os.PathLike, written: int):
        free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else ".").free
        super().__init__(
            f"No space left on the device of {path}: writing it needs more than {written / 2**20:.1f} MiB "
            f"({free / 2**20:.1f} MiB free there). Free some space and run again; nothing partial was kept."
        )


def disk_use(path: str | os.PathLike) -> int:
    """Bytes in a file, or in a folder's files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_mode(path: str | os.PathLike) -> None:
    """Give a file 0666 and a folder 0777, less the umask."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~current_umask())


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", fsync: bool = False) -> Iterator:
    """Write to a temporary name beside `path` and rename it over `path` only once complete.

    Beside, not in /tmp: a rename within one filesystem is atomic, a copy from another one is not, and a
    full disk or a kill in the middle of a copy would leave half a file under the real name. `fsync`
    also survives a power cut, at a cost worth paying for checkpoints, not for every image.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        umask_mode(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC and not isinstance(err, DiskFull):
            raise DiskFull(path, disk_use(tmp)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomically(data: dict, path: str | os.PathLike) -> Path:
    """A JSON record a reader sees whole or not at all."""
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2)
    return Path(path)


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)  # a read-only folder, file or filesystem


def check_writable(folder: str | os.PathLike, what: str, hint: str, rewritten: tuple[str, ...] = ()) -> None:
    """Refuse `folder` (`what`, e.g. "The run folder") when it, a folder in it or a file of `rewritten` (written
    in place, not by rename) cannot be written, before any work; `hint`: what to do instead.

    A real probe (a file made and removed; an existing file opened to append, which changes nothing): root's
    `os.access` calls a 0555 folder writable, and no permission bit tells of a read-only mount. A folder not
    made yet is probed at its nearest existing parent, where it would be made."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    folders = [existing, *(Path(root) / d for root, dirs, _ in os.walk(folder) for d in dirs)]
    files = [folder / name for name in rewritten if (folder / name).is_file()]
    path = existing
    try:
        for path in folders:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        for path in files:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as err:
        if err.errno not in NOT_WRITABLE:
            raise
        raise ConfigError(
            f"{what} {folder} is read-only: {path} cannot be written ({os.strerror(err.errno)}). Nothing was "
            f"changed. Make it writable, or {hint}."
        ) from None


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ProcessLock:
    """An exclusive lock whose file names the holding process, so that a process kept out can say by whom.

    `fcntl.flock`: the system releases it when its holder dies, however it dies. A clean release empties
    the file; a pid still in it tells the next holder that it takes over a dead process's lock.
    """

    def __init__(self, path: str | os.PathLike, what: str, say_every: float = 5.0):
        self.path = Path(path)
        self.what = what
        self.say_every = say_every
        self._fd: int | None = None

    def holder(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        previous = self.holder()
        if previous and previous != os.getpid() and not pid_running(previous):
            log.warning("Took over %s (%s) from pid %d, which is no longer running.", self.path, self.what, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def acquire(self) -> ProcessLock:
        """Wait for the lock, saying every `say_every` seconds what for and who holds it."""
        started = said = time.monotonic()
        while not self.try_acquire():
            now = time.monotonic()
            if now - said >= self.say_every:
                log.warning(
                    "Waiting %.0f s for %s (%s), held by pid %s",
                    now - started,
                    self.what,
                    self.path,
                    self.holder() or "unknown",
                )
                said = now
            time.sleep(0.1)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ProcessLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
