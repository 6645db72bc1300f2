"""Files that appear whole or not at all, with the permissions any other tool would give them.

`tempfile` creates files 0600 and folders 0700, which would keep a shared cluster group from reading
an export; what we write is given the mode the process's umask allows, as `open` and `mkdir` do.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
