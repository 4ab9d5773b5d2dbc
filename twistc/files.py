"""Files twistc writes beside a user's own: checked before any expensive work, written atomically.

Every file twistc saves (checkpoints, the latency cache, run records) is written into a temporary
file in the same folder, named `.NAME.twistc-PID.tmp`, and renamed over NAME only when complete, so
a stop, a full disk or a file-size limit leaves the previous version intact. A temporary file
whose process is gone (killed during a save) is removed by the next save of the same file.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

from twistc.errors import SpecError

# errors of the file system that a user can fix (room, limits, permissions), reported as one line
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class WriteError(SpecError):
    """A file could not be written; the message says which and what was kept."""


def _temp_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.twistc-{pid}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of earlier saves of `path` whose process has ended; returns them."""
    removed = []
    prefix = f".{path.name}.twistc-"
    try:
        candidates = list(path.parent.glob(f"{prefix}*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name[len(prefix):-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write(path: Path, write: Callable[[object], None], what: str, kept: str) -> Path:
    """Write `path` through `write(binary file)` into a temporary file, then rename it into place.
    A failure leaves `path` as it was and no temporary file; a full disk or a file-size limit is a
    WriteError naming `what` and what was `kept`."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = _temp_name(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in WRITE_ERRNOS:
            raise WriteError(f"cannot write {what} {path}: {e.strerror}; {kept}") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path("/")


def check_writable(path: str | Path, flag: str, folder: bool) -> Path:
    """Refuse, with one line naming `flag`, a path that twistc could not create or write: a file where a
    folder is needed or the reverse, a path under a regular file, or one inside a folder it may not
    write. Returns the absolute path. Nothing is created."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    kind = "folder" if folder else "file"
    if path.exists():
        if folder and not path.is_dir():
            raise SpecError(f"{flag} {path} is a file; give a folder")
        if not folder and path.is_dir():
            raise SpecError(f"{flag} {path} is a folder; give a file path")
    elif path.is_symlink():
        raise SpecError(f"{flag} {path} is a dangling symbolic link; remove it or choose another path")
    existing = _nearest_existing(path.parent if not folder or not path.is_dir() else path)
    if not existing.is_dir():
        raise SpecError(f"{flag} {path} lies under {existing}, which is a file; choose another {kind}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"{flag} {path}: twistc may not write in {existing}; choose another {kind}")
    return path


def check_distinct(paths: dict[str, Path | None]) -> None:
    """Refuse two options (or an option and the input) that name the same path: `paths` maps a name (e.g.
    '--checkpoint') to its path."""
    named = [(name, Path(os.path.abspath(p)).resolve()) for name, p in paths.items() if p is not None]
    for i, (a, pa) in enumerate(named):
        for b, pb in named[i + 1:]:
            if pa == pb:
                raise SpecError(f"{a} and {b} name the same path {pa}; give each its own")
