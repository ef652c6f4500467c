"""Folders the tool writes to, checked before any work; and the temp files a killed writer leaves.

Every temp file or folder wmbench writes is named `.<final name>.<pid>.<random>.tmp` next to its final
name, so a later start can tell an orphan (its writer's process is gone) from a live write of another
process (two workers of a sweep share one --runs-dir) and remove only the orphans.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from wmbench.core.errors import UserError

_TMP = re.compile(r"^\..+\.(\d+)\.[^.]*\.tmp$")


def tmp_prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}."


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create `path` (and parents) if needed and prove it takes a file; UserError in one line if not."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder")
    for parent in [p, *p.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {p} is under {parent}, which is a file")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=tmp_prefix(p / "probe"), suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {p} is not writable ({e.strerror or e})") from None
    return p


def probe_dir(path: str | os.PathLike, flag: str) -> Path:
    """writable_dir for a dry run (--check): the folders it had to create are removed again."""
    p = Path(path).absolute()
    missing = [q for q in [p, *p.parents] if not q.exists()]
    try:
        return writable_dir(p, flag)
    finally:
        for q in missing:          # deepest first
            try:
                q.rmdir()
            except OSError:
                pass


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, another user's
        return True
    return True


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders in `folder` whose writing process no longer exists."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks (datasets and checkpoints are large)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

