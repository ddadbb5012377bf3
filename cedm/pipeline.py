"""The stage layer: every pipeline stage runs through `execute` (docs/method.md#pipeline).

A stage declares its config (what the user asked for), its inputs (the artifacts it reads: stage
folders, or files) and computes into a work folder. The layer owns everything else:

- identity: the config plus the hash of every input (a stage folder's manifest, else the file);
  the manifest records both, and the result is reused only when both match;
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

REDO = ".redo"
_REPORTING: contextvars.ContextVar = contextvars.ContextVar("cedm_stage_reporting", default=None)


# ----------------------------------------------------------------------------------------------
# Shared flags and the device

def add_common(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    """Flags every stage shares."""
    if run_dir:
        p.add_argument("--run-dir", default="runs/default", metavar="DIR",
                       help="run directory that holds every stage's artifacts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)")
    p.add_argument("--force", action="store_true",
                   help="redo the stage even if its outputs exist with another config (the old "
                        "result stays until the new one is complete)")
    p.add_argument("--pushgateway", default=os.environ.get("CEDM_PUSHGATEWAY"), metavar="HOST:PORT",
                   help="push stage outcome and duration to this Prometheus Pushgateway "
                        "(default: $CEDM_PUSHGATEWAY, unset = no push)")


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
        out[_key(p, root)] = input_hash(p)
    return out


def diff_keys(old: dict | None, new: dict | None) -> list[str]:
    old, new = old or {}, new or {}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


@dataclass(frozen=True)
class Decision:
    action: str            # "skip" | "run" | "redo" | "refuse"
    reason: str = ""
    inputs: dict = field(default_factory=dict)     # the input hashes the result will record
    continuing: bool = False   # resumable: the work folder holds an earlier, killed redo of this


def decide(old: dict | None, config: dict, inputs: dict, force: bool) -> Decision:
    """Skip / run / redo / refuse from the finished manifest `old` (None: nothing finished).

    Pure: the same answer on every rank. Same config and inputs: skip (unless force). Another
    config: refuse unless force. Same config, changed inputs: redo (the old result is stale).
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
    atomically, so a link never sees a write), without the manifest."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if rel.as_posix() == MANIFEST or _is_tmp(p):
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
           "outputs": result.outputs, "versions": versions(),
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
    d = replace(decide(old, stage.config, inputs, force), inputs=inputs)
    if d.action == "refuse":
        raise CedmError(f"{out} was {d.reason}; use --force to redo it, or another --run-dir")
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
