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
  over), or that cannot rewrite it two beats running (an I/O error: ESTALE/EIO on NFS, a full
  disk; a waiter would take it over), has lost it: the beat thread records why (`lost()`) and
  interrupts the main thread, which stops with a one-line CedmError naming the new holder. It is
  never handled like Ctrl-C: `cedm train` writes no checkpoint then (cedm/training_loop.py);
- before each write, a long-running writer calls `check()`: when the last renewal is older than
  `stale / 2` (the process was frozen, e.g. SIGSTOP or a paused VM, and its beat thread has not
  looked yet) it reads the lease first, so a holder that wakes up taken over writes nothing.

Every cedm write is itself atomic (a temporary name renamed into place), so even the one window
left (a holder frozen past `stale` inside a write) cannot tear a file.

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

_HELD: list[Lease] = []              # the leases this process holds now


class Lease:
    """A held lease: beats in a thread; `lost` says why it stopped being ours (None: still ours)."""

    def __init__(self, out: Path, path: Path, me: Holder, stale: float, beat: float,
                 on_lost: Callable[[], None], linked_at: float):
        self.out, self.path, self.me, self.stale, self.beat = out, path, me, stale, beat
        self.lost: str | None = None
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # The bytes of our last write of the lease, when it began, and the start of the last write
        # found back at the path: no waiter sees those bytes unchanged for `stale` s before then.
        self._written = (linked_at, me.encode())
        self._renewed = linked_at
        self._fd = os.open(path, os.O_RDWR)
        _HELD.append(self)
        self._thread = threading.Thread(target=self._run, name=f"cedm-lease {path.name}", daemon=True)
        self._thread.start()

    def _why_not_ours(self) -> str | None:
        """None while the lease is ours, else how it was lost (OSError when it cannot be read)."""
        raw = _read(self.path)
        if raw is not None and raw == self._written[1]:
            self._renewed = self._written[0]              # our last write is what the path holds
            return None
        holder = _decode(raw) if raw else None
        if holder is not None and holder.token == self.me.token:
            return None
        if holder is not None:
            return f"was taken over by {holder.describe()} while this process did not renew it"
        return "was removed by another process" if raw is None else "was replaced by another process"

    def _ours(self) -> bool:
        return self._why_not_ours() is None

    def _lose(self, why: str) -> bool:
        """Record the loss once; True for the caller that recorded it."""
        with self._lock:
            if self.lost is not None:
                return False
            self.lost = why
            return True

    def error(self) -> CedmError:
        return CedmError(f"stopped: the lease of {self.out} {self.lost}; nothing more was written")

    def check(self) -> None:
        """Raise error() if the lease is lost; read it first when the last renewal is old."""
        if self.lost is None and time.monotonic() - self._renewed >= self.stale / 2:
            why: str | None = None
            for wait in (0.0, 0.05, 0.1):              # a waiter may have it renamed aside for a moment
                time.sleep(wait)
                try:
                    why = self._why_not_ours()
                except OSError as e:
                    why = f"could not be read ({e})"
                if why is None:
                    break
            if why is not None:
                self._lose(why)
        if self.lost is not None:
            raise self.error()

    def _renew(self) -> None:
        self.me.beat += 1
        data = self.me.encode()
        t = time.monotonic()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)
        self._written = (t, data)

    def _run(self) -> None:
        misses = failures = 0
        while not self._stop.wait(self.beat):
            try:
                why = self._why_not_ours()
                if why is None:
                    self._renew()
                failures = 0
            except OSError as e:                          # ESTALE/EIO on NFS, ENOSPC: not renewed
                failures += 1
                if failures < 2:
                    continue
                why = f"could not be renewed ({e}), so another process could take it over"
            else:
                misses = 0 if why is None else misses + 1  # a waiter may have it renamed aside for a moment
                if why is None or misses < 2:
                    continue
            if self._lose(why) and not self._stop.is_set():
                self._on_lost()
            return

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(ValueError):
            _HELD.remove(self)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(OSError):
            if self.lost is None and self._ours():
                self.path.unlink(missing_ok=True)


def lost() -> CedmError | None:
    """The error to stop with when a lease this process holds was lost, else None (what the
    handlers of an interrupt look at: a lost lease is never a Ctrl-C)."""
    return next((held.error() for held in _HELD if held.lost is not None), None)


def check() -> None:
    """Before a write: raise the CedmError of a lost lease this process holds (see Lease.check)."""
    for held in list(_HELD):
        held.check()


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
        mine = False
        while True:
            linked_at = time.monotonic()
            if mine or _link(tmp, path):
                try:
                    return Lease(out, path, me, stale, beat, on_lost or _thread.interrupt_main, linked_at)
                except FileNotFoundError:
                    # A waiter that saw the previous (dead) holder's bytes renamed our new lease
                    # aside to inspect it, and puts it back when it sees they differ: look again.
                    mine = False
                    time.sleep(0.01)
                    continue
            raw = _read(path)
            if raw is None:
                continue                                  # released meanwhile: try again
            if raw != seen:
                seen, seen_at = raw, clock()
            holder = _decode(raw)
            if holder is not None and holder.token == token:
                mine = True                               # ours, put back by such a waiter
                continue
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
    made: list[Path] = []

    def prune():                            # leave no empty folder the lease alone created
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()

    try:
        made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
        out.parent.mkdir(parents=True, exist_ok=True)
        lease = acquire(out, what, **kw)
    except OSError as e:
        prune()
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            yield None
            return
        fix = ("a part of that path is a file, not a folder: choose another --run-dir"
               if e.errno in (errno.ENOTDIR, errno.EEXIST) else
               "free space on that volume" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
               f"check that {out.parent} is a writable folder")
        raise CedmError(f"cannot take the lease {lease_path(out)} of {out}: {e.strerror or e}"
                        + (f" ({e.filename})" if e.filename else "") + f"; {fix}") from None
    try:
        yield lease
    except KeyboardInterrupt:
        if lease.lost:                      # the beat thread's interrupt, where no handler raised it
            raise lease.error() from None
        raise
    finally:
        lease.release()
        prune()
