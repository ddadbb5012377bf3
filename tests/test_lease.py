"""One writer per stage folder (cedm/lease.py, docs/runbook.md#one-writer-per-model), with real
processes: a live holder is named, a killed one (kill -9) is taken over, a holder on "another
machine" (no PID to check: the NFS case) is waited for and taken over only once its lease has
stopped changing, contenders never overlap, a holder that stalls past the staleness stops before
it writes more, and a `cedm train` killed mid-run and resumed by a second `cedm train` ends with
the same weights as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cedm import lease
from cedm.io import CedmError

REPO = Path(__file__).resolve().parents[1]

# A process that takes the lease of OUT and holds it until killed; FOREIGN=1 makes it look like
# a process on another machine (another host, boot id and PID namespace), so that a waiter here
# cannot check its PID and must go by the lease's heartbeat alone, as across NFS clients.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from cedm import lease
    if os.environ.get("FOREIGN") == "1":
        lease._machine = lambda: {"host": f"node-{os.getpid()}", "boot": f"boot-{os.getpid()}", "pidns": "pid:[1]"}
    with lease.hold(Path(sys.argv[1]), "holder", stale=float(sys.argv[2])):
        print("held", flush=True)
        while True:
            time.sleep(0.05)
""")


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def _holder(out: Path, stale: float = 1.0, foreign: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(stale)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(FOREIGN="1" if foreign else "0"))
    assert p.stdout.readline().strip() == "held", p.stderr.read()
    return p


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_a_live_holder_on_this_machine_is_named_at_once(tmp_path):
    out = tmp_path / "train" / "temi-C5"
    p = _holder(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(CedmError, match=rf"is being written by holder \(pid {p.pid} on "):
            lease.acquire(out, "second", stale=30, wait=30, say=lambda m: None)
        assert time.monotonic() - t0 < 5                 # no waiting: its PID shows it is alive
    finally:
        _kill(p)


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    out = tmp_path / "train" / "temi-C5"
    p = _holder(out)
    _kill(p)                                            # kill -9: its lease stays behind
    assert lease.lease_path(out).exists()
    said = []
    t0 = time.monotonic()
    held = lease.acquire(out, "second", stale=30, wait=30, say=said.append)
    try:
        assert time.monotonic() - t0 < 5 and "that process has ended" in said[0] and str(p.pid) in said[0]
    finally:
        held.release()
    assert not lease.lease_path(out).exists()           # released: nothing left behind


def test_a_holder_elsewhere_is_waited_for_and_taken_over_only_when_silent(tmp_path):
    """The NFS case: no PID to check. A beating holder is waited for (bounded, then named); once
    killed, its lease stops changing and is taken over after `stale` seconds, not before."""
    out = tmp_path / "train" / "temi-C5"
    p = _holder(out, stale=1.0, foreign=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(CedmError, match=r"is being written by holder .*gave up after 3s"):
            lease.acquire(out, "second", stale=1.0, wait=3.0, say=lambda m: None)
        assert time.monotonic() - t0 >= 3                # waited, although stale is 1 s: it kept beating
    finally:
        _kill(p)
    said = []
    t0 = time.monotonic()
    held = lease.acquire(out, "second", stale=1.0, wait=10.0, say=said.append)
    held.release()
    assert 1.0 <= time.monotonic() - t0 < 8, said
    assert any("unchanged for 1s" in m for m in said), said


def test_the_environment_sets_the_times(monkeypatch):
    monkeypatch.setenv("CEDM_LEASE_STALE", "60")
    monkeypatch.delenv("CEDM_LEASE_WAIT", raising=False)
    stale, wait, beat = lease.timings()
    assert (stale, beat) == (60, 10) and wait == 80       # a waiter outlasts a dead holder's staleness
    monkeypatch.setenv("CEDM_LEASE_WAIT", "soon")
    with pytest.raises(CedmError, match="CEDM_LEASE_WAIT='soon' is not a number of seconds"):
        lease.timings()


def test_a_holder_that_stalls_past_stale_stops_before_writing_more(tmp_path):
    """SIGSTOP the holder longer than `stale`: another process takes the lease over; when the
    holder runs again its heartbeat finds the lease is not its own and its main thread stops with
    a one-line error (exit 2 through the CLI's CedmError handling)."""
    out = tmp_path / "train" / "temi-C5"
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from cedm import lease
        from cedm.io import CedmError
        lease._machine = lambda: {"host": "elsewhere", "boot": "boot-x", "pidns": "pid:[1]"}
        try:
            with lease.hold(Path(sys.argv[1]), "holder", stale=float(sys.argv[2])):
                print("held", flush=True)
                while True:
                    time.sleep(0.05)
        except CedmError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    """)
    p = subprocess.Popen([sys.executable, "-c", script, str(out), "1.0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
    assert p.stdout.readline().strip() == "held"
    p.send_signal(signal.SIGSTOP)
    try:
        held = lease.acquire(out, "taker", stale=1.0, wait=10.0, say=lambda m: None)
    finally:
        p.send_signal(signal.SIGCONT)
    try:
        rc = p.wait(timeout=20)
        err = p.stderr.read()
        assert rc == 2 and "the lease of" in err and "taken over by taker" in err, (rc, err)
        assert held._ours() and held.lost is None        # the taker still holds it
    finally:
        held.release()


# Contenders: each takes the lease, marks the folder busy with an O_EXCL file while "writing",
# and releases; all look foreign to each other (heartbeats only). Any overlap finds the mark.
CONTENDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from cedm import lease
    lease._machine = lambda: {"host": f"node-{os.getpid()}", "boot": f"boot-{os.getpid()}", "pidns": "pid:[1]"}
    out, rounds, log = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    for _ in range(rounds):
        with lease.hold(out, f"contender {os.getpid()}", stale=2.0, wait=60.0, say=lambda m: None):
            fd = os.open(out.parent / "writing", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # raises on overlap
            with log.open("a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(0.1)
            os.close(fd)
            os.unlink(out.parent / "writing")
""")


@pytest.mark.slow
def test_contenders_never_write_at_once_even_when_holders_are_killed(tmp_path):
    out = tmp_path / "train" / "temi-C5"
    out.parent.mkdir(parents=True)
    log = tmp_path / "log"

    def start():
        return subprocess.Popen([sys.executable, "-c", CONTENDER, str(out), "6", str(log)], env=_env(),
                                stderr=subprocess.PIPE, text=True)
    procs = [start() for _ in range(4)]
    killed = 0
    t0 = time.monotonic()
    while killed < 2 and time.monotonic() - t0 < 60:    # kill -9 two holders inside their write
        if (out.parent / "writing").exists():
            raw = lease._read(lease.lease_path(out))
            holder = lease._decode(raw) if raw else None
            victim = next((p for p in procs if holder and p.pid == holder.pid and p.poll() is None), None)
            if victim is not None:
                _kill(victim)
                (out.parent / "writing").unlink()         # what a killed writer leaves; its lease stays
                procs.remove(victim)
                procs.append(start())
                killed += 1
        time.sleep(0.02)
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert killed == 2
    assert len(log.read_text().split()) >= 4 * 6          # every surviving contender got all its rounds


# ----------------------------------------------------------------------------------------------
# The stage layer: `cedm train` twice on one run directory, and kill -9 of the first

@pytest.mark.slow
def test_a_second_cedm_train_is_refused_and_a_killed_one_resumes_intact(tmp_path):
    from test_train import _CLI_KW, _cli, _env as train_env, _states_equal, make_run

    from cedm import train
    from cedm.io import load_tensors

    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    train.run(tmp_path / "a", "temi-C5", **_CLI_KW)                      # uninterrupted
    env = train_env()
    first = subprocess.Popen(_cli(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    state = tmp_path / "b/train/temi-C5/state.pt"
    t0 = time.time()
    while not state.exists() and first.poll() is None and time.time() - t0 < 60:
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)            # frozen mid-run: alive, holding the folder
    assert first.poll() is None and not (tmp_path / "b/train/temi-C5/manifest.json").exists()
    second = subprocess.run(_cli(tmp_path / "b"), env=env, capture_output=True, text=True)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"is being written by cedm train (pid {first.pid} on " in lines[0], lines[0]
    _kill(first)                                                         # kill -9 mid-run
    assert state.exists() and lease.lease_path(tmp_path / "b/train/temi-C5").exists()
    assert not (tmp_path / "b/train/temi-C5/manifest.json").exists(), "finished before the kill"
    third = subprocess.run(_cli(tmp_path / "b"), env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "taking over the lease of cedm train" in third.stderr
    _states_equal(load_tensors(tmp_path / "a/train/temi-C5/network.safetensors"),
                  load_tensors(tmp_path / "b/train/temi-C5/network.safetensors"))
    assert not lease.lease_path(tmp_path / "b/train/temi-C5").exists()


# ----------------------------------------------------------------------------------------------
# A lost lease stops its holder at once: never a Ctrl-C (no checkpoint), I/O errors included

def _foreign(monkeypatch):
    """This process looks like another machine's: no PID check, the lease's heartbeat alone."""
    monkeypatch.setattr(lease, "_machine", lambda: {"host": "elsewhere", "boot": "boot-x", "pidns": "pid:[1]"})


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_a_cedm_train_that_lost_its_lease_writes_nothing_more(tmp_path, monkeypatch):
    """SIGSTOP a `cedm train` past the staleness (between two checkpoints), take its folder over,
    SIGCONT: it stops with one line naming the taker, and no file of the folder changes (it used to
    take the lease thread's interrupt for Ctrl-C and write state.pt and the network once more)."""
    from test_train import _env as train_env, make_run

    make_run(tmp_path)
    out = tmp_path / "train" / "temi-C5"
    argv = [sys.executable, "-m", "cedm", "train", "--run-dir", str(tmp_path), "--cond", "temi-C5",
            "--network", "tiny", "--batch-size", "8", "--mimg", str(20000 * 8e-6), "--lr", "2e-3",
            "--checkpoint-every-kimg", "0.08", "--device", "cpu"]          # a checkpoint every 10 steps
    p = subprocess.Popen(argv, env=dict(train_env(), CEDM_LEASE_STALE="1"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not (out / "state.pt").exists() and p.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.01)
        first = (out / "state.pt").stat().st_mtime_ns
        while (out / "state.pt").stat().st_mtime_ns == first and time.monotonic() - t0 < 120:
            time.sleep(0.002)
        p.send_signal(signal.SIGSTOP)                    # just after a checkpoint: not inside a write
        _foreign(monkeypatch)
        held = lease.acquire(out, "taker", stale=1.0, wait=10.0, say=lambda m: None)
    except BaseException:
        _kill(p)
        raise
    try:
        before = _files(out)
        p.send_signal(signal.SIGCONT)
        rc, err = p.wait(timeout=60), p.stderr.read()
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"cedm train: error: stopped: the lease of {out} was "
                                                       f"taken over by taker (pid {os.getpid()} "), err
        assert "saving a checkpoint" not in err
        assert _files(out) == before                    # nothing written after the takeover
        assert held._ours() and held.lost is None
    finally:
        held.release()


def test_the_interrupt_of_a_lost_lease_is_not_taken_for_ctrl_c(tmp_path, monkeypatch):
    """Inside `cedm train`'s Ctrl-C handling (training_loop._HeldInterrupt), the lease thread's
    interrupt raises the lease's error at once: no Ctrl-C is recorded, so no checkpoint follows."""
    from cedm.training_loop import _HeldInterrupt

    out = tmp_path / "train" / "temi-C5"
    with _HeldInterrupt(True) as ctrl_c:
        assert ctrl_c.enabled
        t0 = time.monotonic()
        with pytest.raises(CedmError, match=r"^stopped: the lease of .* was taken over by other \(pid 1 on "):
            with lease.hold(out, "holder", stale=0.6):
                other = lease.Holder(token="x", what="other", host="elsewhere", pid=1, started="now")
                lease.lease_path(out).write_bytes(other.encode())   # another process took it over
                while time.monotonic() - t0 < 10:            # a training step after another
                    time.sleep(0.01)
        assert time.monotonic() - t0 < 3 and not ctrl_c.requested     # two beats of 0.1 s
    assert lease.lost() is None and lease._HELD == []


def test_a_woken_holder_reads_its_lease_before_writing(tmp_path):
    """check(): a renewal within stale/2 means no waiter can have taken over (it needs the lease
    unchanged for `stale`); an older one (the process was frozen and its beat thread has not looked
    yet) is verified by reading the lease, so the writer stops before its write."""
    out = tmp_path / "stage"
    stopped = []
    held = lease.acquire(out, "holder", stale=30, on_lost=lambda: stopped.append(1))   # beats every 5 s
    try:
        lease.check()
        other = lease.Holder(token="x", what="taker", host="elsewhere", pid=1, started="now")
        lease.lease_path(out).write_bytes(other.encode())
        lease.check()                                    # renewed just now: nobody can have taken it yet
        held._renewed -= 20                              # as if frozen for 20 s (> stale / 2)
        with pytest.raises(CedmError, match=r"the lease of .*stage was taken over by taker \(pid 1 on elsewhere"):
            lease.check()
        assert lease.lost() is not None and not stopped   # found by the writer, not by an interrupt
    finally:
        held.release()
    assert lease.lease_path(out).exists()               # the taker's lease is left alone


# A holder whose lease file cannot be rewritten (os.pwrite fails: EIO, as ESTALE/EIO on NFS or
# ENOSPC): it used to lose its beat thread silently and keep writing, unrenewed.
FAILING = textwrap.dedent("""
    import errno, os, sys, time
    from pathlib import Path
    from cedm import lease
    from cedm.io import CedmError
    def pwrite(fd, data, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    try:
        with lease.hold(Path(sys.argv[1]), "holder", stale=0.6):
            os.pwrite = pwrite
            print("held", flush=True)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10:
                time.sleep(0.01)
        print("never stopped", file=sys.stderr)
    except CedmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
""")


def test_a_lease_that_cannot_be_renewed_stops_its_holder(tmp_path):
    out = tmp_path / "train" / "temi-C5"
    p = subprocess.Popen([sys.executable, "-c", FAILING, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
    assert p.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    rc, err = p.wait(timeout=30), p.stderr.read()
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith(f"error: stopped: the lease of {out} could not be renewed ([Errno 5] "), err
    assert time.monotonic() - t0 < 0.6 * 3                  # two failed beats (0.1 s each), well before `stale`


def test_one_failed_renewal_is_tried_again(tmp_path, monkeypatch):
    out = tmp_path / "stage"
    real, calls = os.pwrite, []

    def once_failing(fd, data, offset):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", once_failing)
    stopped = []
    held = lease.acquire(out, "holder", stale=0.3, on_lost=lambda: stopped.append(1))   # beats every 0.05 s
    try:
        t0 = time.monotonic()
        while held.me.beat < 3 and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert held.lost is None and not stopped and held.me.beat >= 3 and held._ours()
    finally:
        held.release()
    assert not lease.lease_path(out).exists()


@pytest.mark.parametrize("case", ["parent is a file", "no space"])
def test_a_lease_that_cannot_be_made_is_a_one_line_error(tmp_path, monkeypatch, case):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out, cause = afile / "train" / "temi-C5", "Not a directory"
    if case == "no space":
        out, cause = tmp_path / "run" / "train" / "temi-C5", "No space left on device"

        def link(src, dst):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(os, "link", link)
    with pytest.raises(CedmError) as e:
        with lease.hold(out, "cedm train"):
            raise AssertionError("held")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"cannot take the lease {lease.lease_path(out)} of {out}: "
                                                         f"{cause}"), msg
    assert ("choose another --run-dir" if case == "parent is a file" else "free space") in msg
    assert not (tmp_path / "run").exists() and afile.read_text() == "x"     # nothing left behind


def test_a_new_lease_a_waiter_moved_aside_for_a_moment_is_still_taken(tmp_path, monkeypatch):
    """A waiter that saw the previous (killed) holder's bytes renames the lease aside to check them
    and links it back when they differ: if that happens between our link and our open, the lease is
    still ours (it failed in CI as 'cannot take the lease ...: No such file or directory')."""
    import os

    from cedm import lease

    out = tmp_path / "train" / "temi-C5"
    path = lease.lease_path(out)
    real_open, moved = os.open, []

    def open_during_a_waiters_check(p, flags, *a, **k):
        if str(p) == str(path) and not moved:
            moved.append(True)
            raise FileNotFoundError(2, "No such file or directory", str(p))   # renamed aside just now
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", open_during_a_waiters_check)
    with lease.hold(out, "cedm train") as held:
        assert moved and held is not None and held._ours()
