"""Run records: one JSON file per run, written atomically, carrying config + environment + metrics.

Schema (version 1):
    {"schema_version": 1, "kind": "bench" | "gridworld" | "atari", "created_at": ISO-8601 UTC,
     "config": {...full resolved config...}, "environment": {...}, "metrics": {name: {"value", "unit",
     "method"?, ...}}, ...extra top-level fields}
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from wmbench.core import allocator
from wmbench.core.paths import remove_orphans, tmp_prefix
from wmbench.core.readback import finite, read_json_object

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("schema_version", "kind", "config", "environment", "metrics")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    """Write `data` to `path` via a temp file in the same folder + fsync + rename.

    overwrite=False never replaces an existing file: the name gets a suffix -2, -3, ... instead (the
    temp file is hard-linked into place, which fails atomically if the name is taken). Returns the path
    written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; records and checkpoints are meant to be shared
        if overwrite:
            os.replace(tmp, path)
        else:
            path = _link_unique(tmp, path)
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _link_unique(tmp: str, path: Path) -> Path:
    for i in range(1, 10_000):
        cand = path if i == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        try:
            os.link(tmp, cand)
            return cand
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {path}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _git_commit() -> dict:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"git_commit": commit, "git_dirty": dirty if commit else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict:
    """Everything needed to interpret a number: versions, commit, hardware, threads."""
    import numpy

    from wmbench.core.version import __version__

    device = torch.device(device)
    env: dict[str, Any] = {
        "wmbench_version": __version__,
        **_git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc": allocator.active(),
    }
    if device.type == "cuda":
        env["gpu_model"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    env["device_name"] = device_name(device)
    return env


def device_name(device: torch.device | str = "cpu") -> str:
    """The machine's name in records: the GPU's model for a CUDA device, else the CPU's."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()


def make_record(kind: str, config: dict, metrics: dict, extra: dict | None = None,
                device: torch.device | str = "cpu") -> dict:
    rec = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "environment": environment(device),
        "metrics": metrics,
    }
    if extra:
        rec.update(extra)
    return rec


def write_record(record: dict, runs_dir: str | os.PathLike = "results/runs", name: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write `record` as RUNS_DIR/NAME.json, atomically. An existing file is never replaced unless
    `overwrite`: two runs finishing in the same second get NAME.json and NAME-2.json."""
    if name is None:
        stamp = record.get("created_at", "").replace(":", "").replace("-", "").replace("+0000", "")
        name = f"{record.get('kind', 'run')}-{stamp}-{os.getpid()}"
    path = Path(runs_dir) / f"{name}.json"
    text = json.dumps(record, indent=2, sort_keys=False, default=_jsonable) + "\n"
    remove_orphans(path.parent)     # temp records of writers killed mid-write: their run re-publishes
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


RECEIPT_ENV = "WMBENCH_RECEIPT"


def note_record(path: str | os.PathLike) -> None:
    """Tell whoever started this command (a sweep, through $WMBENCH_RECEIPT) that the record `path` is
    in its --runs-dir: one JSON line per record, appended. The sweep marks a run done only on a receipt
    whose records exist, so an exit status of 0 alone never counts as a finished run."""
    receipt = os.environ.get(RECEIPT_ENV)
    if not receipt:
        return
    line = json.dumps({"record": str(Path(path).absolute())}) + "\n"
    with open(receipt, "a") as f:        # one short write: atomic for O_APPEND
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class RecordNotSaved(OSError):
    """The record could not be written where asked; `saved_to` says where it went instead, or, when it
    could be written nowhere, `record_text` holds it for the caller to print."""

    def __init__(self, msg: str, saved_to: Path | None, record_text: str | None = None):
        super().__init__(msg)
        self.saved_to = saved_to
        self.record_text = record_text

    def report(self) -> None:
        """One `error:` line on stderr; the record itself on stdout if it was saved nowhere."""
        import sys
        print(f"error: {self}", file=sys.stderr)
        if self.record_text is not None:
            print(self.record_text)


def save_record(record: dict, runs_dir: str | os.PathLike, name: str, fallbacks: tuple = ()) -> Path:
    """write_record, and if that fails (disk full, a folder made read-only during the run), the same
    record in each fallback folder in turn, then the system temp folder: a finished result is never lost.
    Raises RecordNotSaved (naming where it went) when the record is not in `runs_dir`."""
    try:
        path = write_record(record, runs_dir, name=name)
    except OSError as e:
        first = f"could not write the record to {runs_dir} ({e.strerror or e})"
    else:
        note_record(path)
        return path
    for folder in (*fallbacks, Path(tempfile.gettempdir()) / "wmbench-records"):
        try:
            path = write_record(record, folder, name=name)
        except OSError:
            continue
        raise RecordNotSaved(f"{first}; saved it to {path} instead", path)
    raise RecordNotSaved(f"{first}, nor to any fallback folder; the record follows on stdout", None,
                         json.dumps(record, default=_jsonable))


def _jsonable(o: Any):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def validate_record(rec: Any) -> None:
    if not isinstance(rec, dict):
        raise ValueError("record is not a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        raise ValueError(f"record lacks field(s) {', '.join(missing)}")
    for k, t in (("kind", str), ("config", dict), ("environment", dict), ("metrics", dict)):
        if not isinstance(rec[k], t):
            raise ValueError(f"record field {k!r} is not a {t.__name__}")
    if rec["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"unsupported schema_version {rec['schema_version']!r} (expected {SCHEMA_VERSION})")
    # a NaN or infinite metric poisons every mean it enters; null (not measured) is fine
    bad = [name for name, m in rec["metrics"].items() if not finite(m)]
    if bad:
        raise ValueError(f"metric(s) {', '.join(bad)} hold a NaN or infinite number")


def read_record(path: Path) -> dict:
    """The validated record in `path`, its names canonical; ValueError saying why not. A FIFO or device
    named *.json is refused before it is opened (opening a FIFO blocks until someone writes to it)."""
    rec = read_json_object(path, "record")
    validate_record(rec)
    rec["config"] = canonical_names(rec["config"])
    return rec


def load_records(runs_dir: str | os.PathLike = "results/runs", kind: str | None = None,
                 skipped: list | None = None) -> list[dict]:
    """All valid records under `runs_dir`. Corrupt or foreign files are skipped: appended to `skipped` as
    (path, reason) when a list is given, else reported with one warning each."""
    out = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        try:
            rec = read_record(path)
        except ValueError as e:      # UserError (readback) is a ValueError
            # readback's message names the file; the warning line already does
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = first.removeprefix(f"record {path} ")
            if skipped is None:
                warnings.warn(f"skipping {path}: {reason}")
            else:
                skipped.append((str(path), reason))
            continue
        if kind is None or rec["kind"] == kind:
            rec["_path"] = str(path)
            out.append(rec)
    return out


def records_of(runs_dir, kind: str) -> list[dict]:
    """The records of `kind` under `runs_dir`, quietly skipping unusable files (the report names them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_records(runs_dir, kind=kind)


def existing_record(records: list[dict], config: dict, machine: str | None = None) -> str | None:
    """The path of the newest of `records` with the scientific configuration of `config` (and, given
    `machine`, made on it: a runs dir shared by two machines holds a seed once per machine, as the report
    counts it), or None (a cell already run, perhaps with other threads or paths)."""
    want = scientific_config(config)
    recs = [r for r in records if scientific_config(r["config"]) == want
            and (machine is None or r["environment"].get("device_name") == machine)]
    return max(recs, key=lambda r: r.get("created_at", ""))["_path"] if recs else None


# Config fields that say how or where a run ran, never what it computed: out of the seed key.
RUN_TIME_FIELDS = frozenset({
    "threads", "workers", "allocator",              # how fast, not what
    "run_dir", "runs_dir", "data_dir",              # where
    "no_progress", "log_every", "checkpoint_every", "checkpoint_minutes",   # what it showed and saved when
    "auto_choices", "preset",       # preset: informative, the fields it set are in the config
})
# Fields that are run-time only when chosen automatically (the config's `auto_choices` has their key):
# auto precision is measured at each start and flips under load; a precision the user forced stays.
AUTOMATIC_FIELDS = ("precision", "compile")


def scientific_config(config: dict) -> dict:
    """`config` as the key of one (configuration, seed): the model, task, data, schedule and seed that
    decide what a run computes, without run-time settings (RUN_TIME_FIELDS, automatic choices) and with
    canonical names. The report's record_key and `existing_record` (a run's skip check) both use it, so
    a seed re-run with other threads is counted, and skipped, as the same seed."""
    auto = config.get("auto_choices")
    auto = auto if isinstance(auto, dict) else {}
    cfg = {k: v for k, v in canonical_names(config).items()
           if k not in RUN_TIME_FIELDS and not (k in AUTOMATIC_FIELDS and k in auto)}
    if "precision" in auto and isinstance(cfg.get("model"), dict):
        cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "amp"}   # the same choice, spelt as amp
    return json.loads(json.dumps(cfg, default=str))      # as it reads back from a record: tuples as lists


def canonical_names(config: dict) -> dict:
    """`config` (and the dicts inside it) with backbone names as the registry spells them, lower case:
    older versions kept `--backbone Mamba2` as written, a separate key and report row from `mamba2`."""
    out = {}
    for k, v in config.items():
        if k == "backbone" and isinstance(v, str):
            v = v.lower()
        elif k == "backbones" and isinstance(v, list):
            v = [b.lower() if isinstance(b, str) else b for b in v]
        elif isinstance(v, dict):
            v = canonical_names(v)
        out[k] = v
    return out


def save_record_and_say(record: dict, runs_dir, name: str) -> bool:
    """save_record with the current folder as fallback; prints `record: PATH`, or reports where the record
    went instead (RecordNotSaved.report) and returns False."""
    try:
        print(f"record: {save_record(record, runs_dir, name=name, fallbacks=(Path('.'),))}")
        return True
    except RecordNotSaved as e:
        e.report()
        return False

