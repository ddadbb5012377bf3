"""One writer per stage folder: a lease beside it (docs/runbook.md#one-writer-per-model).

Two `cedm train` of one conditioning on one run directory (a retried pod whose predecessor still
runs, a leaked multi-node job, a user on a laptop) must never write the same folder at once. The
stage layer (`cedm.pipeline.execute`) holds `<parent>/.<name>.lease` while a stage decides and
writes `<parent>/<name>`; only the writing rank holds it.

It works on a shared ReadWriteMany volume (NFS) without `flock`:
- taking it is `link(2)` of a fully written private file onto the lease name: atomic on the
  server, fails if the name exists (a lost NFS reply that hides a success is caught by the link
  count of the private file);
- the holder rewrites the lease in place every `beat` seconds (a counter: the record changes);
- a waiter judges staleness by its own clock only (no clock is compared across machines): a lease
  whose bytes have not changed for `stale` seconds is taken over, by renaming it aside and checking
  that what was renamed is what was seen stale (else it is put back);
- on the same machine (same boot, same PID namespace) a holder whose process is gone is taken over
  at once, and a live one is named at once instead of waited for;
- a holder that finds the lease no longer its own (it stalled for `stale` seconds and was taken
  over) stops its main thread with a CedmError before it writes more.

Every cedm write is itself atomic (a temporary name renamed into place), so even the one window
left (a holder frozen past `stale`, until its next beat) cannot tear a file.

Times come from CEDM_LEASE_STALE (seconds, default 180: well above NFS attribute caching, 60 s by
default) and CEDM_LEASE_WAIT (default: stale + two beats, so a dead holder elsewhere is always
taken over before a waiter gives up); a waiter that gives up exits 2 naming the holder.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from cedm.io import CedmError

STALE_S = 180.0


def lease_path(out: Path) -> Path:
    """The lease of stage folder `out`: a hidden file beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.lease"


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise CedmError(f"{name}={text!r} is not a number of seconds; unset it or give e.g. 180") from None
    if value < 0:
        raise CedmError(f"{name}={text!r} must be >= 0 seconds")
    return value


def timings(stale: float | None = None, wait: float | None = None) -> tuple[float, float, float]:
    """(stale, wait, beat) in seconds: arguments, else the environment, else the defaults."""
    stale = _env_seconds("CEDM_LEASE_STALE", STALE_S) if stale is None else stale
    beat = max(0.05, stale / 6)
    wait = _env_seconds("CEDM_LEASE_WAIT", stale + 2 * beat) if wait is None else wait
    return stale, wait, beat


# ----------------------------------------------------------------------------------------------
# Who holds it

def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or ''."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


def _machine() -> dict:
    """What makes a PID comparable: the host name, the kernel's boot id and the PID namespace."""
    return {"host": socket.gethostname(), "boot": _read_text("/proc/sys/kernel/random/boot_id"),
            "pidns": os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else ""}


@dataclass
class Holder:
    token: str
    what: str
    host: str
    pid: int
    started: str
    machine: dict = field(default_factory=dict)
    pid_start: str = ""
    beat: int = 0

    def describe(self) -> str:
        return f"{self.what} (pid {self.pid} on {self.host}, since {self.started})"

    def same_machine(self) -> bool:
        here = _machine()
        return bool(here["boot"] and here["pidns"]) and self.machine == here

    def alive(self) -> bool:
        """Only meaningful on the same machine: the PID runs and is the same process."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return not self.pid_start or _start_ticks(self.pid) in ("", self.pid_start)

    def encode(self) -> bytes:
        return (json.dumps(self.__dict__, sort_keys=True) + "\n").encode()


def _decode(raw: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):
        return None                      # being rewritten, or not ours: treated as alive


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------
# Taking and holding it

class Lease:
    """A held lease: beats in a thread; `lost` says why it stopped being ours."""

    def __init__(self, path: Path, me: Holder, beat: float, on_lost: Callable[[], None]):
        self.path, self.me, self.beat = path, me, beat
        self.lost: str | None = None
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._fd = os.open(path, os.O_RDWR)
        self._thread = threading.Thread(target=self._run, name=f"cedm-lease {path.name}", daemon=True)
        self._thread.start()

    def _ours(self) -> bool:
        raw = _read(self.path)
        holder = _decode(raw) if raw is not None else None
        return holder is not None and holder.token == self.me.token

    def _run(self) -> None:
        misses = 0
        while not self._stop.wait(self.beat):
            if not self._ours():
                misses += 1                   # a waiter may have it renamed aside for a moment
                if misses < 2:
                    continue
                raw = _read(self.path)
                other = _decode(raw) if raw else None
                self.lost = f"taken over by {other.describe()}" if other else "removed by another process"
                self._on_lost()
                return
            misses = 0
            self.me.beat += 1
            data = self.me.encode()
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
            os.fsync(self._fd)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)
        if self.lost is None and self._ours():
            self.path.unlink(missing_ok=True)


def _link(tmp: Path, path: Path) -> bool:
    """Create `path` as a hard link to `tmp` if it does not exist; True if we made it."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        # NFS: a retransmitted LINK can report EEXIST for our own success
        return os.stat(tmp).st_nlink >= 2 and _read(path) == _read(tmp)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    try:                                   # a filesystem without hard links: O_EXCL create
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(tmp.read_bytes())
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, seen: bytes, token: str) -> None:
    """Remove the lease only if it still holds exactly the bytes that were seen stale."""
    aside = path.with_name(f"{path.name}.{token}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != seen:               # renewed (or replaced) meanwhile: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def acquire(out: Path, what: str, stale: float | None = None, wait: float | None = None,
            on_lost: Callable[[], None] | None = None, say: Callable[[str], None] | None = None,
            clock: Callable[[], float] = time.monotonic) -> Lease:
    """Take the lease of stage folder `out` for `what` (e.g. 'cedm train'), waiting for a holder
    at most `wait` seconds and taking over one whose lease has not changed for `stale` seconds.
    A holder that stays is named in a CedmError."""
    import _thread

    stale, wait, beat = timings(stale, wait)
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = lease_path(out)
    token = uuid.uuid4().hex
    me = Holder(token=token, what=what, host=socket.gethostname(), pid=os.getpid(),
                started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=_machine(),
                pid_start=_start_ticks(os.getpid()))
    tmp = path.with_name(f"{path.name}.{token}.new")
    tmp.write_bytes(me.encode())
    deadline = clock() + wait
    seen: bytes | None = None
    seen_at = clock()
    told = False
    try:
        while True:
            if _link(tmp, path):
                return Lease(path, me, beat, on_lost or _thread.interrupt_main)
            raw = _read(path)
            if raw is None:
                continue                                  # released meanwhile: try again
            if raw != seen:
                seen, seen_at = raw, clock()
            holder = _decode(raw)
            if holder is not None and holder.same_machine():
                if not holder.alive():                    # its process is gone: no need to wait
                    say(f"{what}: taking over the lease of {holder.describe()}: that process has ended")
                    _take_over(path, raw, token)
                    continue
                raise CedmError(f"{out} is being written by {holder.describe()}; wait for it to finish "
                                f"or stop it (its lease: {path})")
            if clock() - seen_at >= stale:
                name = holder.describe() if holder else "an unreadable lease"
                say(f"{what}: taking over the lease of {name}: unchanged for {stale:.0f}s (its holder is gone)")
                _take_over(path, raw, token)
                continue
            name = holder.describe() if holder else f"the process that wrote {path}"
            if clock() >= deadline:
                raise CedmError(f"{out} is being written by {name}; gave up after {wait:.0f}s "
                                f"(CEDM_LEASE_WAIT); rerun when it has finished")
            if not told:
                say(f"{what}: {out} is being written by {name}; waiting up to {wait:.0f}s (a holder "
                    f"silent for {stale:.0f}s is taken over)")
                told = True
            time.sleep(min(beat, 1.0, max(0.01, deadline - clock())))
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(out: Path, what: str, enabled: bool = True, **kw) -> Iterator[Lease | None]:
    """Hold the lease of `out` for the block (a no-op when not `enabled`, e.g. on ranks > 0, or
    where the folder's parent cannot be written, so nothing can be written there either)."""
    if not enabled:
        yield None
        return
    out = Path(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lease = acquire(out, what, **kw)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        yield None
        return
    try:
        yield lease
    except KeyboardInterrupt:
        if lease.lost:
            raise CedmError(f"stopped: the lease of {out} was {lease.lost} while this process did not "
                            f"renew it; nothing more was written") from None
        raise
    finally:
        lease.release()
        for d in made:                      # leave no empty folder the lease alone created
            with contextlib.suppress(OSError):
                d.rmdir()
