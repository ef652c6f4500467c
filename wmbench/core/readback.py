"""Files wmbench reads back (records, metrics.jsonl, config.json, sweep state, done markers, checkpoint
meta) are data from outside: a user may edit, truncate or replace them. Every such read goes through
here, so a bad file is one `UserError` line naming it (or a named skip, where skipping is safe), never a
traceback, and never a hang (a FIFO or device named `x.json` is refused before it is opened).

    read_json(path, what)           the parsed JSON; UserError if missing, not a regular file, too large,
                                    not JSON, or holding NaN / Infinity
    read_json_object(path, what)    the same, and it must be a JSON object
    iter_jsonl(path)                the rows of a JSON-lines log: (line number, dict) for every good line;
                                    a bad line (cut by a crash, hand-edited) is collected in `bad`
    finite(value)                   True if a number (or every number inside a container) is finite
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from wmbench.core.errors import UserError

MAX_JSON_BYTES = 256 * 2**20     # a record with 100k episode rows is a few MB; nothing we write nears this


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def loads(text: str | bytes) -> Any:
    """json.loads without NaN / Infinity (Python's json accepts them; no other reader does)."""
    return json.loads(text, parse_constant=_no_constants)


def regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file (following a symlink); False for a folder, FIFO, socket, device or nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def check_regular(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a regular file of sane size, else UserError naming it."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise UserError(f"{what} {path} is {kind}")
    if st.st_size > MAX_JSON_BYTES:
        raise UserError(f"{what} {path} is {st.st_size / 2**20:.0f} MiB, too large to be one")
    return path


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = check_regular(path, what)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    try:
        return loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} is not valid JSON ({msg})") from None


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} holds a JSON {type(value).__name__}, not an object")
    return value


def iter_jsonl(path: str | os.PathLike, bad: list | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each line of `path` that is a JSON object; other lines are appended to
    `bad` as (line number, reason). A missing file yields nothing; a non-regular one is a UserError."""
    path = Path(path)
    if not path.exists():
        return
    check_regular(path, "log")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                row = loads(raw)
            except (ValueError, UnicodeDecodeError):
                reason = "not JSON (cut by a crash?)"
            else:
                if isinstance(row, dict):
                    yield n, row
                    continue
                reason = f"a JSON {type(row).__name__}, not an object"
            if bad is not None:
                bad.append((n, reason))


def finite(value: Any) -> bool:
    """False if `value` is, or contains (in lists and dict values), a NaN or infinite float."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True
