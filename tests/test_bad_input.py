"""What a newcomer breaks, through the CLI (issue 26): every flag that names a file, a folder, a
host or a port is checked before any work, every skip checks the bytes it skips over, and a bad
input is exit code 2 with one line naming the problem and the fix, no traceback, nothing
half-written and the previous good result intact."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cedm import cli, hub, pipeline, train
from cedm.io import RunDir, load_tensors, write_manifest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.err


def _user_error(rc, err, *needles):
    """Exit code 2, one line on stderr, no traceback, naming what it must."""
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def _tree(root: Path) -> dict:
    """{relative path: bytes} of every file under root (what "intact" compares)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rerecord(path: Path) -> None:
    """A test edits a finished result by hand: its stage's manifest records the new bytes, or the
    edit is damage (cedm.pipeline.damage). Not for users: a redo is the way to change a result."""
    man_path = path.parent / "manifest.json"
    man = json.loads(man_path.read_text())
    man[pipeline.FILES][path.name] = pipeline.fingerprint(path)
    man_path.write_text(json.dumps(man))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A digits run (200 images) with data, features (pixels) and knn made through the CLI."""
    run = tmp_path_factory.mktemp("prepared") / "run"
    for argv in (["data", "--dataset", "digits", "--limit", "200"], ["features"], ["knn"]):
        assert cli.main([argv[0], "--run-dir", str(run), *argv[1:]]) == 0
    return run


@pytest.fixture()
def run(prepared, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(prepared, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# 1. --run-dir naming a file

def test_a_run_dir_that_is_a_file_is_an_error_before_any_work(tmp_path, capsys, run):
    f = tmp_path / "afile"
    f.write_text("mine")
    _user_error(*_cli(capsys, "data", "--run-dir", f, "--dataset", "digits"), "--run-dir", "is a file")
    _user_error(*_cli(capsys, "data", "--run-dir", f / "sub", "--dataset", "digits"), f"lies under {f}")
    _user_error(*_cli(capsys, "knn", "--run-dir", run / "knn" / "knn.npy"), "is a file")     # any stage
    assert f.read_text() == "mine" and sorted(tmp_path.iterdir()) == [f, run]


# ----------------------------------------------------------------------------------------------
# 2. --pushgateway: checked before work; an unreachable one never fails a finished stage

def test_a_bad_pushgateway_is_an_error_before_work_and_an_unreachable_one_a_warning(run, capsys, monkeypatch):
    shutil.rmtree(run / "knn")
    for bad, needle in (("not a host", "holds spaces"), ("http://[::1", "Invalid IPv6 URL"),
                        ("localhost:99999", "Port out of range"), ("host:port", "not a valid host[:port]"),
                        ("http://host:9091/?x=1", "a query")):
        _user_error(*_cli(capsys, "knn", "--run-dir", run, "--pushgateway", bad), f"--pushgateway {bad!r}",
                    "leave --pushgateway and $CEDM_PUSHGATEWAY unset")
        assert not (run / "knn").exists()                 # no work done
    monkeypatch.setenv("CEDM_PUSHGATEWAY", "not a host")  # the default comes from the environment
    _user_error(*_cli(capsys, "knn", "--run-dir", run), "$CEDM_PUSHGATEWAY")
    monkeypatch.delenv("CEDM_PUSHGATEWAY")

    with socket.socket() as s:                            # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, err = _cli(capsys, "knn", "--run-dir", run, "--pushgateway", f"127.0.0.1:{port}")
    assert rc == 0 and "Traceback" not in err, err
    assert "does not answer" in err and "could not push metrics" in err
    assert (run / "knn" / "manifest.json").exists()


# ----------------------------------------------------------------------------------------------
# 3. A damaged input is never reused; a damaged result of the stage itself is redone

def test_a_damaged_input_is_an_error_naming_the_file_and_a_damaged_output_is_redone(run, capsys):
    feats, knn = run / "features" / "features.npy", run / "knn" / "knn.npy"
    good_feats, good_knn = feats.read_bytes(), _tree(run / "knn")
    feats.write_bytes(good_feats[:1000])                  # truncated, manifest intact
    _user_error(*_cli(capsys, "knn", "--run-dir", run), "features/features.npy is 1000 bytes",
                "run the `cedm features` command")
    assert _tree(run / "knn") == good_knn                 # the previous result is untouched
    rc, err = _cli(capsys, "features", "--run-dir", run, "--shard", "0/2")
    assert rc == 0 and "has nothing to do" not in err     # a shard does not skip over a damaged result
    rc, err = _cli(capsys, "features", "--run-dir", run)
    assert rc == 0 and "it is damaged (features.npy is 1000 bytes" in err and "redoing it" in err, err
    assert feats.read_bytes() == good_feats               # pixels features are deterministic
    rc, err = _cli(capsys, "knn", "--run-dir", run)
    assert rc == 0 and "inputs changed" in err
    assert knn.read_bytes() == good_knn["knn.npy"]

    # Same size, other bytes (the start of the array zeroed): redone, not skipped.
    b = bytearray(knn.read_bytes())
    b[200:400] = bytes(200)
    knn.write_bytes(bytes(b))
    rc, err = _cli(capsys, "knn", "--run-dir", run)
    assert rc == 0 and "knn.npy is not the file that was written" in err and "redoing it" in err, err
    assert knn.read_bytes() == good_knn["knn.npy"]
    rc, err = _cli(capsys, "knn", "--run-dir", run)
    assert rc == 0 and "up to date" in err                # and then skipped again


def test_a_manifest_from_before_file_records_still_skips(run, capsys):
    man = json.loads((run / "knn" / "manifest.json").read_text())
    man.pop(pipeline.FILES)
    (run / "knn" / "manifest.json").write_text(json.dumps(man))
    rc, err = _cli(capsys, "knn", "--run-dir", run)
    assert rc == 0 and "up to date" in err


def test_a_redo_of_a_damaged_training_does_not_carry_the_damaged_file_over(tmp_path, capsys):
    from test_train import SMALL, make_run

    make_run(tmp_path)
    kw = dict(SMALL, mimg=24e-6, device="cpu")
    train.run(tmp_path, "temi-C5", **kw)
    out = tmp_path / "train" / "temi-C5"
    good = {k: v.clone() for k, v in load_tensors(out / "network.safetensors").items()}   # not the mmap
    (out / "network.safetensors").write_bytes(b"torn")
    train.run(tmp_path, "temi-C5", **kw)                  # redone: resumes the intact state.pt at its end
    err = capsys.readouterr().err
    assert "network.safetensors is 4 bytes" in err and "redoing it" in err
    again = load_tensors(out / "network.safetensors")
    assert good.keys() == again.keys() and all(torch.equal(good[k], again[k]) for k in good)


# ----------------------------------------------------------------------------------------------
# 4. A weights file the user names is never replaced by a fallback metric

def _fake_samples(run: Path, tag: str = "labels") -> None:
    imgs = np.load(run / "data" / "images.npy")
    d = RunDir(run).sample(tag)
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "images.npz", images=np.roll(imgs, 3, axis=0)[:40], clusters=np.zeros(40, np.int64))
    write_manifest(d, "sample", {"cond": tag})


def test_named_weights_that_are_missing_or_do_not_load_are_errors_not_a_fallback(run, tmp_path, capsys):
    _fake_samples(run)
    base = ["evaluate", "--run-dir", run, "--cond", "labels", "--sets", "1", "--num", "20"]
    assert _cli(capsys, *base, "--metric", "backbone")[0] == 0
    good = _tree(run / "eval" / "labels")
    _user_error(*_cli(capsys, *base, "--inception-weights", "/nonexistent.pth", "--force"),
                "--inception-weights /nonexistent.pth: no such file")
    _user_error(*_cli(capsys, *base, "--metric", "fdd", "--dinov2-weights", tmp_path / "nope.pth", "--force"),
                "--dinov2-weights", "no such file")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    _user_error(*_cli(capsys, *base, "--metric", "fid", "--inception-weights", bad, "--force"),
                "could not load Inception-v3 weights")
    assert _tree(run / "eval" / "labels") == good         # the previous result is intact
    assert not list((run / "eval").glob(".labels*"))      # and nothing half-written beside it


# ----------------------------------------------------------------------------------------------
# 5. No network: found once, in seconds, and the offline path taken

def test_no_network_is_found_fast_and_sets_the_offline_flag(monkeypatch, capsys):
    import huggingface_hub.constants as c

    monkeypatch.delenv("CEDM_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_PROBED", {})
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert hub.offline(f"http://127.0.0.1:{listening.getsockname()[1]}") is False
    assert "HF_HUB_OFFLINE" not in os.environ and capsys.readouterr().err == ""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{closed}")   # the Hugging Face hub does not answer
    t0 = time.time()
    assert hub.offline(f"https://127.0.0.1:{closed}") is True
    assert time.time() - t0 < hub.PROBE_SECONDS + 1
    assert os.environ["HF_HUB_OFFLINE"] == "1" and c.HF_HUB_OFFLINE is True
    err = capsys.readouterr().err
    assert err.startswith("cedm: no network") and len(err.splitlines()) == 1
    assert hub.offline(f"https://127.0.0.1:{closed}") is True and capsys.readouterr().err == ""   # once
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("CEDM_OFFLINE", "0")                # always try: no probe
    monkeypatch.setattr(hub, "_PROBED", {})
    assert hub.offline(f"https://127.0.0.1:{closed}") is False and hub._PROBED == {}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "CEDM_OFFLINE")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1",
               OMP_NUM_THREADS=str(torch.get_num_threads()), **extra)
    return env


@pytest.mark.slow
def test_features_without_network_and_without_offline_flag_fails_in_seconds(run, tmp_path):
    """No HF_HUB_OFFLINE / CEDM_OFFLINE (tests/conftest.py sets them; not here), an empty hub
    cache and a hub that cannot be reached (TEST-NET-1, RFC 5737): one line says so, then the
    loader's own "not cached" error, with no retries (they took about a minute)."""
    argv = [sys.executable, "-m", "cedm", "features", "--run-dir", str(run), "--force",
            "--backbone", "vit_base_patch16_224.dino"]
    env = _env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://192.0.2.1")
    t0 = time.time()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cedm: no network (192.0.2.1:443" in r.stderr and "Retrying" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if "error:" in ln][0].startswith(
        "cedm features: error: cannot load pretrained weights")
    assert len(r.stderr.strip().splitlines()) == 2, r.stderr
    if took >= 15:              # a busy machine: what the detection adds to the offline path itself
        t0 = time.time()
        subprocess.run(argv, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, timeout=120)
        assert took - (time.time() - t0) < hub.PROBE_SECONDS + 2, took
    assert (run / "features" / "manifest.json").exists()  # the previous result is intact


# ----------------------------------------------------------------------------------------------
# 6. Run-directory traps

def test_the_default_run_dir_is_the_last_run_prepared_and_said(tmp_path, capsys, monkeypatch):
    from cedm import sweep

    monkeypatch.chdir(tmp_path)

    def the_run(run_dir, dataset, *a, **k):               # `cedm run`, up to its data stage
        sweep._stage(["data", "--run-dir", str(run_dir), "--dataset", dataset, "--limit", "100"])

    monkeypatch.setattr(sweep, "sweep", the_run)
    assert _cli(capsys, "run")[0] == 0                    # writes runs/digits
    assert (tmp_path / "runs" / ".last").read_text().strip() == "runs/digits"
    rc, err = _cli(capsys, "features")
    assert rc == 0 and "--run-dir runs/digits (the last run prepared, from runs/.last" in err, err
    assert (tmp_path / "runs" / "digits" / "features" / "manifest.json").exists()
    assert not (tmp_path / "runs" / "default").exists()
    rc, err = _cli(capsys, "conds", "--candidates", "10")  # plan's conds: the same default as the stages
    assert rc == 0 and "cedm conds: --run-dir runs/digits (the last run prepared" in err, err
    assert not (tmp_path / "runs" / "default").exists()

    # A command that prepares a run starts from runs/default, not the last run.
    assert _cli(capsys, "data", "--dataset", "digits", "--limit", "50")[0] == 0
    assert (tmp_path / "runs" / "default" / "data" / "manifest.json").exists()
    assert (tmp_path / "runs" / ".last").read_text().strip() == "runs/default"

    # No record (runs made before it was kept): an error naming the runs that exist.
    (tmp_path / "runs" / ".last").unlink()
    shutil.rmtree(tmp_path / "runs" / "default")
    _user_error(*_cli(capsys, "knn"), "runs/default does not exist", "--run-dir runs/digits")


def test_a_sweep_names_the_stage_that_conflicts_and_the_two_ways_out(run, capsys):
    mine = _tree(run)                                     # the user's own: `cedm data --limit 200`, ...
    rc, err = _cli(capsys, "run", "--run-dir", run)
    assert rc == 2 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err
    cmd = f"cedm data --run-dir {run} --seed 0 --dataset digits"
    assert f"stage `{cmd}` conflicts with {run / 'data'}: it was made with a different config " \
           f"(differs in: limit) by another command" in errors[0], errors[0]
    assert f"`{cmd} --force` (replaces that result)" in errors[0] and "another --run-dir" in errors[0]
    assert _tree(run) == mine                             # the user's results are kept


# ----------------------------------------------------------------------------------------------
# 7. Ctrl-C in `cedm train` before its first checkpoint

@pytest.mark.slow
def test_ctrl_c_keeps_a_checkpoint_and_the_rerun_resumes_to_identical_weights(tmp_path):
    from test_train import make_run

    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    flags = dict(network="tiny", batch_size=8, mimg=60 * 8e-6, lr=2e-3, lr_ramp_mimg=0.0001,
                 checkpoint_every_kimg=1000.0, augment_p=0.12, device="cpu")   # no checkpoint before the end
    train.run(tmp_path / "a", "temi-C5", progress=False, **flags)             # uninterrupted
    argv = [sys.executable, "-m", "cedm", "train", "--run-dir", str(tmp_path / "b"), "--cond", "temi-C5"]
    argv += [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))]
    out = tmp_path / "b" / "train" / "temi-C5"
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "log.jsonl").exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)                                    # a step done (logged after each)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    assert 0 < step < 60 and not (out / "manifest.json").exists()
    assert f"the state after step {step} of 60" in err and "the same command resumes" in err
    r = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {out} from step {step}" in r.stderr
    a = load_tensors(tmp_path / "a" / "train" / "temi-C5" / "network.safetensors")
    b = load_tensors(out / "network.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Siblings: every other flag that names a file, a folder or a port

def test_every_flag_naming_a_file_folder_or_port_is_checked_before_work(run, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    before = _tree(run)
    cases = [
        (["bound", "--run-dir", run, "--next", "--next-out", tmp_path], "--next-out", "is a folder"),
        (["bound", "--run-dir", run, "--next", "--c-max-out", f / "x"], "--c-max-out", "which is a file"),
        (["plan", "--dataset", "digits", "--outputs", f], "--outputs", "is a file, not a folder"),
        (["sweep-exit", "--runs", f, "--dataset", "digits", "--workflow", "w", "--status", "Succeeded",
          "--duration", "1"], "--runs", "is a file, not a folder"),
        (["report", "--run-dir", run, "--out", f], "--out", "is a file, not a folder"),       # was replaced by the report
        (["report", "--run-dir", run, "--out", f / "sub"], "--out", f"{f} is a file"),       # was a traceback
        (["data", "--run-dir", run, "--dataset", "cifar10", "--force", "--source",
          "https://192.0.2.1/cifar-10-python.tar.gz"], "could not download", "offline", "--source"),
        (["train", "--run-dir", run, "--cond", "uncond", "--metrics-port", "99999"], "--metrics-port 99999",
         "1-65535"),
        (["train", "--run-dir", run, "--cond", "uncond", "--metrics-port", "0"], "is not a port"),
        (["features", "--run-dir", run, "--force", "--backbone", "vit_tiny_patch16_224", "--weights",
          tmp_path / "w.safetensors"], "--weights", "no such file"),
        (["clip-labels", "--run-dir", run, "--weights", tmp_path / "clip.bin"], "--weights", "no such file"),
        (["run", "--run-dir", tmp_path / "new", "--clip-weights", tmp_path / "clip.bin"], "--clip-weights"),
        (["run", "--run-dir", tmp_path / "new", "--inception-weights", tmp_path / "i.pth"], "--inception-weights"),
        (["ablations", "--run-dir", run, "--dinov2-weights", tmp_path / "d.pth"], "--dinov2-weights"),
    ]
    for argv, *needles in cases:
        _user_error(*_cli(capsys, *argv), *needles)
    assert _tree(run) == before and sorted(tmp_path.iterdir()) == [f, run] and f.read_text() == "x"
    # cedm.cli.OUTPUT_DIRS names dests, whatever the command: every --out is a folder (report's)
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    outs = [(name, a.metavar) for name, p in sub.choices.items() for a in p._actions if a.dest == "out"]
    assert outs == [("report", "DIR")], outs


def test_a_damaged_cache_is_made_again_not_an_error_that_force_cannot_clear(run, capsys):
    """eval/_reference holds caches (reference statistics, the classifier judge), outside any stage
    folder: a damaged one was an error saying --force, which reads the same cache again."""
    _fake_samples(run)
    argv = ["evaluate", "--run-dir", run, "--cond", "labels", "--metric", "backbone", "--sets", "1", "--num", "20"]
    assert _cli(capsys, *argv)[0] == 0
    first = json.loads((run / "eval" / "labels" / "metrics.json").read_text())
    caches = sorted((run / "eval" / "_reference").glob("*.npz"))
    assert caches
    for c in caches:
        c.write_bytes(c.read_bytes()[:50])
    rc, err = _cli(capsys, *argv, "--force")
    assert rc == 0 and "Traceback" not in err, err
    assert all(f"{c} does not load (truncated or corrupt)" in err for c in caches), err
    again = json.loads((run / "eval" / "labels" / "metrics.json").read_text())
    assert again["mean"] == first["mean"]                 # made again, the same numbers


def test_force_gets_past_an_unreadable_training_state_as_the_error_says(tmp_path, capsys):
    from test_train import make_run

    make_run(tmp_path)
    out = tmp_path / "train" / "temi-C5"
    out.mkdir(parents=True)
    (out / "state.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    argv = ["train", "--run-dir", tmp_path, "--cond", "temi-C5", "--network", "tiny", "--batch-size", "8",
            "--mimg", "16e-6", "--device", "cpu"]
    _user_error(*_cli(capsys, *argv), "cannot read training state", "use --force")
    rc, err = _cli(capsys, *argv, "--force")
    assert rc == 0 and "does not load; --force restarts the run" in err, err
    assert (out / "manifest.json").exists()
