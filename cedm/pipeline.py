"""The stage layer: every pipeline stage runs through `execute` (docs/method.md#pipeline).

A stage declares its config (what the user asked for), its inputs (the artifacts it reads: stage
folders, or files) and computes into a work folder. The layer owns everything else:

- identity: the config plus the hash of every input (a stage folder's manifest, else the file);
  the manifest records both, and the result is reused only when both match;
- integrity: the manifest also records a fingerprint of every file the stage wrote (`FILES`), and
  a skip, or a stage reading a finished folder, first checks those bytes are still there
  (`damage`): a damaged output of the stage itself is redone, a damaged input is an error naming
  the file (docs/method.md#pipeline);
- the decision (`decide`, a pure function): skip (same identity), redo (inputs changed, or
  --force), refuse (another config without --force, naming the keys that differ);
- freshness: an input stage folder whose own inputs changed since it was made is refused by
  name (it must be brought up to date first), so a change upstream can never be reused silently;
- atomicity: a stage computes into a staging folder beside its output and is swapped in only on
  success, with the manifest written last; a failing run (or a failing --force) leaves the
  previous result as it was. Resumable stages (train, features) compute in place while no result
  is finished, and into a fixed `.<name>.redo` folder beside a finished one, so a killed redo
  resumes as well;
- stale temporary files (`*.tmp`, e.g. from a kill during a checkpoint write) are removed;
- one writer: the writing rank holds the folder's lease (`cedm.lease`) while it decides and
  writes, so a second process on the same folder waits or is told who holds it;
- telemetry: outcome and duration through `cedm.telemetry.stage`.

Also the flags every stage shares (`add_common`) and `resolve_device`, so stages never import
the CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import inspect
import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from cedm import lease
from cedm.io import MANIFEST, CedmError, input_hash, load_json, save_json, temp_dir, versions

# The manifest's record of the stage's files: {path relative to the folder: [size, fingerprint]},
# or [size] alone for the files left unhashed in a folder of more than MANY (`file_records`).
FILES = "files"
WHOLE = 1 << 20                  # files up to 1 MiB are hashed whole; larger ones sampled:
BLOCKS, BLOCK = 16, 1 << 16      # 16 blocks of 64 KiB, the first at the start, the last at the end
MANY = 256                       # hashed files per set (top level, subfolders) of a large folder

REDO = ".redo"
_REPORTING: contextvars.ContextVar = contextvars.ContextVar("cedm_stage_reporting", default=None)


# ----------------------------------------------------------------------------------------------
# Shared flags and the device

RUNS = Path("runs")               # the run directories' default home, under the working directory
DEFAULT_RUN = RUNS / "default"
LAST_RUN = RUNS / ".last"         # the last run under runs/ that `cedm data`, `sweep` or `run` prepared


def add_common(p: argparse.ArgumentParser, run_dir: bool = True, starts_run: bool = False) -> None:
    """Flags every stage shares. starts_run: the command prepares a run (data, sweep, run), so its
    --run-dir defaults to runs/default; the others default to the last run prepared (`run_dir_default`)."""
    if run_dir:
        add_run_dir(p, starts_run)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)")
    p.add_argument("--force", action="store_true",
                   help="redo the stage even if its outputs exist with another config (the old "
                        "result stays until the new one is complete)")
    p.add_argument("--pushgateway", default=os.environ.get("CEDM_PUSHGATEWAY"), metavar="HOST:PORT",
                   help="push stage outcome and duration to this Prometheus Pushgateway "
                        "(default: $CEDM_PUSHGATEWAY, unset = no push); a bad value is an error before "
                        "any work, a gateway that does not answer only a warning")


def add_run_dir(p: argparse.ArgumentParser, starts_run: bool = False) -> None:
    """--run-dir: runs/default for a command that prepares a run (starts_run), else None, which
    cli.check_args resolves to the last run prepared (run_dir_default)."""
    if starts_run:
        p.add_argument("--run-dir", default=str(DEFAULT_RUN), metavar="DIR",
                       help="run directory that holds every stage's artifacts (default: %(default)s)")
    else:
        p.add_argument("--run-dir", default=None, metavar="DIR",
                       help=f"run directory that holds every stage's artifacts (default: the last run under "
                            f"{RUNS}/ that `cedm data`, `cedm sweep` or `cedm run` prepared, recorded in "
                            f"{LAST_RUN} and named on stderr; else {DEFAULT_RUN})")
    p.set_defaults(starts_run=starts_run)


def run_dir_default(command: str) -> str:
    """--run-dir when it is not given: the last run prepared under runs/ (LAST_RUN, said on
    stderr), else runs/default. When neither exists but runs/ holds prepared runs, an error
    naming them (a run made before runs/.last was kept)."""
    last = None
    try:
        last = LAST_RUN.read_text().strip() or None
    except OSError:
        pass
    if last and (Path(last) / "data" / MANIFEST).is_file():
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"cedm {command}: --run-dir {last} (the last run prepared, from {LAST_RUN}; pass "
                  f"--run-dir to choose another)", file=sys.stderr)
        return last
    if not DEFAULT_RUN.exists() and RUNS.is_dir():
        runs = sorted(d.as_posix() for d in RUNS.iterdir() if (d / "data" / MANIFEST).is_file())
        if runs:
            raise CedmError(f"no --run-dir given and {DEFAULT_RUN} does not exist, but {RUNS}/ holds the "
                            f"run(s) {', '.join(runs)}: pass --run-dir {runs[0]} (or another)")
    return str(DEFAULT_RUN)


def remember_run(run_dir) -> None:
    """Record `run_dir` as the last run prepared (LAST_RUN), when it lies under runs/ and holds a
    prepared dataset. Best effort: a read-only working directory records nothing."""
    if run_dir is None or not (Path(run_dir) / "data" / MANIFEST).is_file():
        return
    try:
        rel = Path(os.path.relpath(Path(run_dir).resolve(), Path.cwd()))
        if rel.parts[:1] != (RUNS.name,) or len(rel.parts) < 2:
            return
        from cedm.io import write_bytes

        write_bytes(LAST_RUN, (rel.as_posix() + "\n").encode())
    except (OSError, ValueError):
        pass


def file_in_the_way(path) -> Path | None:
    """The file that keeps a folder from being made at `path`: `path` itself or its first existing
    ancestor when that is not a directory; None when the folder can be made (or exists)."""
    for q in (Path(path), *Path(path).parents):
        if q.exists():
            return None if q.is_dir() else q
    return None


def check_run_dir(run_dir) -> None:
    """A --run-dir that is (or lies under) an existing file is an error before any work."""
    bad = file_in_the_way(run_dir)
    if bad is not None:
        what = "is a file" if bad == Path(run_dir) else f"lies under {bad}, which is a file"
        raise CedmError(f"--run-dir {run_dir} {what}, not a directory; pass a directory (it is "
                        f"created when missing)")


def optional(text: str) -> str | None:
    """An argparse type for an optional value: an empty one (an Argo parameter left empty) is the
    flag's default, None."""
    return text or None


def resolve_device(name):
    """A torch.device from a --device value (None: cuda when available, else cpu)."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CedmError(f"invalid --device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CedmError(f"--device {name} asked for, but no CUDA device is available")
    return dev


# ----------------------------------------------------------------------------------------------
# Telemetry

def _telemetry_stage(name: str, pushgateway, labels: dict):
    from cedm import telemetry

    accepted = inspect.signature(telemetry.stage).parameters
    kw = {k: v for k, v in labels.items() if k in accepted and v is not None}
    return telemetry.stage(name, pushgateway, **kw)


@contextlib.contextmanager
def reporting(name: str, pushgateway=None, **labels):
    """Report one stage invocation to telemetry (the CLI wraps each command in it, so a bad flag
    counts as a failure too); `execute` inside it marks a skip on it instead of reporting twice."""
    with _telemetry_stage(name, pushgateway, labels) as run:
        token = _REPORTING.set(run)
        try:
            yield run
        finally:
            _REPORTING.reset(token)


# ----------------------------------------------------------------------------------------------
# Identity and the decision

def normalise(obj) -> Any:
    """JSON round trip (sorted keys; numpy and paths made plain), as the manifest stores it."""
    from cedm.io import _json_default

    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _key(path: Path, root: Path) -> str:
    """An input's name in the manifest: its path relative to the run root (portable)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def _resolve(key: str, root: Path) -> Path:
    p = Path(key)
    return p if p.is_absolute() else Path(root) / p


def fingerprint(path: Path) -> list:
    """[size, hash] of a file: sha256 of the whole file up to WHOLE bytes, else of its size and
    BLOCKS evenly spaced blocks (first and last included). Cheap on a large artifact (1 MiB read
    whatever the size, docs/performance.md#integrity); it finds a truncated, extended, replaced or
    zeroed-out file, not every flipped byte of a large one."""
    import hashlib

    size = Path(path).stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE:
            h.update(f.read())
        else:
            h.update(str(size).encode())
            for i in range(BLOCKS):
                f.seek(i * (size - BLOCK) // (BLOCKS - 1))
                h.update(f.read(BLOCK))
    return [size, h.hexdigest()[:32]]


def _files(folder: Path) -> dict[str, int]:
    """{relative path: size} of every file a stage left in `folder` (not the manifest, not
    temporary files, nor what lies in a temporary folder), sorted by path. os.walk and one stat
    per file: pathlib's rglob costs 60 us a file (0.6 s for a folder of 10,000)."""
    import stat

    out = {}
    for top, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.endswith(".tmp")]
        rel_top = os.path.relpath(top, folder).replace(os.sep, "/")
        for name in names:
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            if name.endswith(".tmp") or rel == MANIFEST:
                continue
            try:
                st = os.stat(os.path.join(top, name))
            except OSError:                       # a dangling link
                continue
            if stat.S_ISREG(st.st_mode):
                out[rel] = st.st_size
    return dict(sorted(out.items()))


def _spread(items: list, m: int) -> list:
    """m of `items` evenly spaced (the first and the last included); all of them when no more."""
    n = len(items)
    return list(items) if n <= m else [items[i * (n - 1) // (m - 1)] for i in range(m)]


def file_records(folder) -> dict:
    """The manifest's FILES record of `folder`: {relative path: [size, fingerprint]}, every file
    hashed while the folder holds at most MANY. A larger one (`sample --png`, a balanced image
    folder: tens of thousands of PNGs) records every file's size but hashes only its top-level
    files (the stage's arrays) and MANY of those in its subfolders, each set evenly spaced in
    sorted order when larger than MANY: [size] alone for the others. So writing and checking a
    folder stays one stat per file plus at most 2 x MANY fingerprints (docs/performance.md#integrity)."""
    folder = Path(folder)
    sizes = _files(folder)
    rels = list(sizes)
    hashed = set(rels)
    if len(rels) > MANY:
        hashed = set(_spread([r for r in rels if "/" not in r], MANY) + _spread([r for r in rels if "/" in r], MANY))
    return {r: fingerprint(folder / r) if r in hashed else [sizes[r]] for r in rels}


def _differs(path, rec) -> str | None:
    """How the file at `path` differs from its FILES record (size, then the fingerprint when one
    was recorded), or None. One stat when no fingerprint was recorded."""
    import stat

    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        return "is missing"
    size = st.st_size
    if size != rec[0]:
        return f"is {size} bytes, but {rec[0]} were written"
    if len(rec) > 1 and fingerprint(path) != list(rec):
        return "is not the file that was written (same size, other bytes)"
    return None


def damage(folder, manifest: dict | None = None) -> str | None:
    """What differs between `folder` and the files its manifest recorded, naming the first file
    (missing, another size, other bytes), or None when they match. A manifest written before files
    were recorded (no FILES key) has nothing to check: None. Every size is checked before any
    fingerprint (one stat per file); files recorded with a size alone are checked by their size."""
    folder = Path(folder)
    man = manifest if manifest is not None else finished_manifest(folder)
    files = (man or {}).get(FILES)
    if not files:
        return None
    root = str(folder)
    for rel, rec in sorted(files.items()):                  # sizes first: one stat per file
        bad = _differs(os.path.join(root, rel), rec[:1])
        if bad:
            return f"{rel} {bad}"
    for rel, rec in sorted(files.items()):
        bad = _differs(os.path.join(root, rel), rec) if len(rec) > 1 else None
        if bad:
            return f"{rel} {bad}"
    return None


def check_intact(path: Path, root: Path) -> None:
    """Refuse an input stage folder whose files are not the bytes its manifest recorded."""
    bad = damage(path)
    if bad:
        man = finished_manifest(path) or {}
        name = _key(path, root)
        raise CedmError(f"input {name}/{bad} (damaged); run the `cedm {man.get('stage', name)}` command that "
                        f"made {name} again (it redoes a damaged result), then this one")


def check_fresh(path: Path, root: Path) -> None:
    """Refuse an input stage folder whose own recorded inputs have changed since it was made."""
    m = Path(path) / MANIFEST
    if not Path(path).is_dir() or not m.exists():
        return
    for key, old in (load_json(m).get("inputs") or {}).items():
        p = _resolve(key, root)
        if not p.exists():
            continue            # recorded by another layout (e.g. a copied run); cannot check
        if (p.is_dir() and not (p / MANIFEST).exists()) or input_hash(p) != old:
            name = _key(path, root)
            raise CedmError(f"{name} is out of date: its input {key} changed since it was made; "
                            f"run the stage that makes {name} again first")


def input_hashes(inputs, root: Path) -> dict[str, str]:
    """{key: hash} of every input (a stage folder must be complete and up to date)."""
    out = {}
    for p in inputs:
        p = Path(p)
        if not p.is_file():
            if not (p / MANIFEST).exists():
                raise CedmError(f"missing input {_key(p, root)} (incomplete or not made yet); "
                                f"run the stage that makes it first")
            check_fresh(p, root)
            check_intact(p, root)
        out[_key(p, root)] = input_hash(p)
    return out


def diff_keys(old: dict | None, new: dict | None) -> list[str]:
    old, new = old or {}, new or {}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class Conflict(CedmError):
    """A finished result made with another config, refused without --force (`decide`)."""

    def __init__(self, out: Path, reason: str):
        self.out, self.reason = Path(out), reason
        super().__init__(f"{out} was {reason}; use --force to redo it, or another --run-dir")


@dataclass(frozen=True)
class Decision:
    action: str            # "skip" | "run" | "redo" | "refuse"
    reason: str = ""
    inputs: dict = field(default_factory=dict)     # the input hashes the result will record
    continuing: bool = False   # resumable: the work folder holds an earlier, killed redo of this


def decide(old: dict | None, config: dict, inputs: dict, force: bool, damaged: str | None = None) -> Decision:
    """Skip / run / redo / refuse from the finished manifest `old` (None: nothing finished).

    Pure: the same answer on every rank. Same config and inputs: skip (unless force). Another
    config: refuse unless force. Same config, changed inputs: redo (the old result is stale).
    `damaged` (`damage` of the finished folder): a result whose files are not the bytes it wrote
    is redone, never skipped.
    """
    if old is None:
        return Decision("run")
    cdiff = diff_keys(old.get("config"), config)
    idiff = diff_keys(old.get("inputs"), inputs)
    if cdiff and not force:
        return Decision("refuse", f"made with a different config (differs in: {', '.join(cdiff)})")
    if force:
        return Decision("redo", "--force")
    if idiff:
        return Decision("redo", f"its inputs changed since it was made ({', '.join(idiff)})")
    if damaged:
        return Decision("redo", f"it is damaged ({damaged})")
    return Decision("skip", "up to date (same config and inputs)")


# ----------------------------------------------------------------------------------------------
# Execution

@dataclass
class Stage:
    """One stage invocation: its name, output folder, run root, config and input artifacts."""
    name: str
    out: Path
    root: Path
    config: dict
    inputs: list = field(default_factory=list)
    resumable: bool = False          # computes in place / in `.<name>.redo` and may be resumed
    seed_redo: bool = False          # a redo starts from a copy of the finished result (extension)

    def __post_init__(self):
        self.out, self.root = Path(self.out), Path(self.root)
        self.config = normalise(self.config)


@dataclass
class Result:
    """What `execute` did: skipped or not, where the result is, its manifest, compute's value."""
    skipped: bool
    out: Path
    manifest: dict | None
    value: Any = None
    finished: bool = True


@dataclass
class Output:
    """What a compute function returns: the files it wrote (for the manifest), extra manifest
    fields, a value handed back to the caller, and finished=False for a run stopped early."""
    outputs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    value: Any = None
    finished: bool = True


def _is_tmp(p: Path) -> bool:
    return p.name.endswith(".tmp")


def clean_stale(out: Path) -> list[Path]:
    """Remove leftovers of killed runs: `*.tmp` inside `out`, `.<name>.*.tmp` beside it."""
    removed = []
    for d in (out, out.parent / f".{out.name}{REDO}"):
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*.tmp"), reverse=True):
                if p.exists():
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                    removed.append(p)
    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}.*.tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _prune_empty(d: Path, stop: Path) -> None:
    """Remove `d` and its parents up to (not including) `stop` while they are empty."""
    stop = stop.resolve()
    d = d.resolve()
    while d != stop and stop in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def _seed(src: Path, dst: Path) -> None:
    """Fill `dst` with `src`'s files (hard links where possible; every writer replaces files
    atomically, so a link never sees a write), without the manifest, and without a file that is
    not the bytes the manifest recorded (a damaged file is made again, never carried over)."""
    recorded = (finished_manifest(src) or {}).get(FILES) or {}
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if rel.as_posix() == MANIFEST or _is_tmp(p):
            continue
        rec = recorded.get(rel.as_posix())
        if rec is not None and p.is_file() and _differs(p, rec):
            continue
        q = dst / rel
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, q)
        except OSError:
            shutil.copy2(p, q)


def _swap_in(work: Path, out: Path) -> None:
    """Replace `out` by the finished `work` folder: the old result goes only once the new is there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp", dir=out.parent))
        os.replace(out, old / "result")
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(work: Path, stage: Stage, inputs: dict, result: Output) -> dict:
    import time

    # run_id: every finished run is distinct, so a redo always changes what downstream stages see
    # (the manifest's hash), even with the same config within the same second.
    man = {"stage": stage.name, "run_id": uuid.uuid4().hex, "config": stage.config, "inputs": inputs,
           "outputs": result.outputs, FILES: file_records(work),
           "versions": versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    man.update(normalise(result.extra or {}))
    save_json(work / MANIFEST, man)
    return man


def finished_manifest(out) -> dict | None:
    m = Path(out) / MANIFEST
    return load_json(m) if m.exists() else None


def execute(stage: Stage, compute: Callable[[Path, Decision], Output], force: bool = False,
            pushgateway=None, rank: int = 0, barrier: Callable[[], None] | None = None,
            quiet: bool = False, labels: dict | None = None) -> Result:
    """Run `stage` through the layer: decide, compute into a work folder, write the manifest
    last, swap it in. `compute(work, decision)` writes its files under `work` and returns an
    Output. Only rank 0 writes; every rank decides the same way and calls compute. quiet: no
    "skipped" line (the stage prints its own); a redo forced by changed inputs is always said."""
    active = _REPORTING.get()
    labels = {"run_dir": stage.root, **(labels or {})}
    ctx = contextlib.nullcontext(active) if active is not None else \
        _telemetry_stage(stage.name, pushgateway, labels)
    barrier = barrier or (lambda: None)
    with ctx as run, lease.hold(stage.out, f"cedm {stage.name}", enabled=rank == 0):
        barrier()                   # the other ranks decide only once the writing rank holds the folder
        res = _execute(stage, compute, force, rank, barrier, quiet)
        if res.skipped:
            run.skipped = True
        return res


def _say(stage: Stage, msg: str, quiet: bool, rank: int) -> None:
    if not quiet and rank == 0:
        print(f"cedm {stage.name}: {msg}", file=sys.stderr)


def _execute(stage: Stage, compute, force: bool, rank: int, barrier, quiet: bool) -> Result:
    out = stage.out
    inputs = input_hashes(stage.inputs, stage.root)
    old = finished_manifest(out)
    damaged = damage(out, old) if old is not None and not force else None   # checked before any skip
    d = replace(decide(old, stage.config, inputs, force, damaged), inputs=inputs)
    if d.action == "refuse":
        raise Conflict(out, d.reason)
    if d.action == "skip":
        _say(stage, f"{out} is {d.reason}; skipped", quiet, rank)
        return Result(True, out, old)
    if d.action == "redo" and d.reason != "--force":                # said even when quiet
        _say(stage, f"{out}: {d.reason}; redoing it", False, rank)

    fresh_tmp = None
    stop = stage.root if stage.root.exists() else stage.root.parent    # never leave an empty run dir
    work = out
    if stage.resumable:
        work = out if old is None else out.parent / f".{out.name}{REDO}"
        d = replace(d, continuing=old is not None and work.exists())
    elif rank != 0:
        raise CedmError(f"stage {stage.name} does not run on several processes")
    barrier()                                   # every rank has looked before rank 0 changes files
    if rank == 0:
        clean_stale(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not stage.resumable:
            fresh_tmp = work = temp_dir(out.parent, f".{out.name}.")
        elif old is not None and not d.continuing:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            if stage.seed_redo:
                _seed(out, work)
        work.mkdir(parents=True, exist_ok=True)
    barrier()
    try:
        result = compute(work, d)
        if result is None:
            result = Output()
        if not result.finished:
            return Result(False, out, None, result.value, finished=False)
        man = None
        if rank == 0:
            lease.check()          # a holder that lost the folder (frozen, then taken over) writes nothing more
            man = write_manifest(work, stage, inputs, result)
            if work != out:
                _swap_in(work, out)
        barrier()
        return Result(False, out, man, result.value)
    except BaseException:
        if fresh_tmp is not None:
            shutil.rmtree(fresh_tmp, ignore_errors=True)
            _prune_empty(out.parent, stop)
        elif stage.resumable and rank == 0 and work.is_dir() and not any(work.iterdir()):
            _prune_empty(work, stop)          # nothing to resume from: leave no trace
        raise
