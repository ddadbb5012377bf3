"""The stage layer (cedm.pipeline): skip / redo / refuse, staging, stale files, and the defects
found by trying the pipeline as a new user would (one test per finding)."""
import json
import os

import numpy as np
import pytest
import torch

from cedm import cli, pipeline, train
from cedm.checkpoint import resume_policy
from cedm.io import CedmError, RunDir, load_array, save_array, save_json, write_manifest

from test_train import SMALL, _states_equal, make_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _recluster(rd: RunDir, assign, seed: int) -> None:
    """Redo cluster/temi-C5 with other assignments (as `cedm cluster --force` would)."""
    cdir = rd.cluster("temi", 5)
    save_array(cdir / "assignments.npy", assign)
    save_json(cdir / "summary.json", {"q": (np.bincount(assign, minlength=5) / len(assign)).tolist()})
    write_manifest(cdir, "cluster", {"method": "temi", "clusters": 5, "seed": seed})


def _cli(capsys, *argv):
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The decision, alone

def test_decide_skip_redo_refuse():
    old = {"config": {"k": 10}, "inputs": {"features": "a"}}
    assert pipeline.decide(None, {"k": 10}, {}, False).action == "run"
    assert pipeline.decide(old, {"k": 10}, {"features": "a"}, False).action == "skip"
    assert pipeline.decide(old, {"k": 10}, {"features": "a"}, True).action == "redo"
    d = pipeline.decide(old, {"k": 10}, {"features": "b"}, False)
    assert d.action == "redo" and "features" in d.reason                  # upstream changed
    d = pipeline.decide(old, {"k": 5}, {"features": "a"}, False)
    assert d.action == "refuse" and "differs in: k" in d.reason
    assert pipeline.decide(old, {"k": 5}, {"features": "b"}, True).action == "redo"


def test_resume_policy():
    cfg, inp = {"lr": 1, "mimg": 2}, {"data": "h"}
    saved = {"config": cfg, "inputs": inp, "nimg": 100}
    assert resume_policy(None, cfg, inp, 2e6, False)[0] == "restart"
    assert resume_policy(saved, cfg, inp, 2e6, False)[0] == "resume"
    assert resume_policy(saved, cfg, inp, 2e6, True)[0] == "restart"
    act, why = resume_policy(saved, cfg, {"data": "other"}, 2e6, False)
    assert act == "restart" and "data" in why                             # stale state
    act, why = resume_policy(saved, {"lr": 2, "mimg": 2}, inp, 2e6, False)
    assert act == "refuse" and "differs in: lr" in why
    assert resume_policy(saved, {"lr": 1, "mimg": 3}, inp, 3e6, True)[0] == "resume"   # extend
    assert resume_policy(saved, {"lr": 2, "mimg": 2}, inp, 2e6, True)[0] == "restart"


# ----------------------------------------------------------------------------------------------
# Re-clustering after training: never a stale model

def test_reclustering_makes_train_redo_and_sample_refuse_until_then(tmp_path, capsys):
    rd = make_run(tmp_path / "run")
    args = ["train", "--run-dir", str(rd.root), "--cond", "temi-C5", "--network", "tiny", "--batch-size", "8",
            "--mimg", "24e-6", "--lr", "2e-3", "--lr-ramp-mimg", "0.0001", "--device", "cpu"]
    assert _cli(capsys, *args)[0] == 0
    old = load_array(rd.cluster("temi", 5) / "assignments.npy")
    new = old.copy()                                      # same non-empty ids, 37 of 48 images move
    new[:37] = np.array([0, 1, 3, 4])[(np.arange(37) + 1) % 4]
    assert (new != old).sum() == 37 and set(new) == set(old)
    _recluster(rd, new, seed=1)

    # The model is now stale: sampling from it is refused, naming what changed.
    rc, err = _cli(capsys, "sample", "--run-dir", str(rd.root), "--cond", "temi-C5", "--num", "2", "--steps", "1")
    assert rc == 2 and "train/temi-C5 is out of date" in err and "cluster/temi-C5" in err
    assert len(err.strip().splitlines()) == 1

    rc, err = _cli(capsys, *args)
    assert rc == 0 and "skipped" not in err and "inputs changed" in err and "cluster/temi-C5" in err
    # ... and the redone model is exactly the one trained on the new clustering from scratch.
    fresh = make_run(tmp_path / "fresh")
    _recluster(fresh, new, seed=1)
    assert _cli(capsys, *[a if a != str(rd.root) else str(fresh.root) for a in args])[0] == 0
    _states_equal(torch.load(rd.train("temi-C5") / "state.pt", weights_only=True)["net"],
                  torch.load(fresh.train("temi-C5") / "state.pt", weights_only=True)["net"])
    assert "skipped" in _cli(capsys, *args)[1]                           # now up to date
    man = json.loads((rd.train("temi-C5") / "manifest.json").read_text())
    assert set(man["inputs"]) == {"data", "cluster/temi-C5"}              # relative to the run root


def test_upstream_change_is_refused_by_name_downstream(tmp_path, capsys):
    rd = make_run(tmp_path)
    save_array(rd.features / "features.npy", np.random.default_rng(0).normal(size=(48, 4)).astype(np.float32))
    pipeline.execute(pipeline.Stage("features", rd.features, rd.root, {"backbone": "synthetic"}, [rd.data]),
                     lambda work, _: save_array(work / "features.npy", load_array(rd.features / "features.npy")))
    assert _cli(capsys, "knn", "--run-dir", str(rd.root), "--k", "3")[0] == 0
    write_manifest(rd.data, "data", {"dataset": "digits", "resolution": 16, "num_classes": 10, "v": 2})
    rc, err = _cli(capsys, "knn", "--run-dir", str(rd.root), "--k", "3")
    assert rc == 2 and "features is out of date: its input data changed" in err


# ----------------------------------------------------------------------------------------------
# A failing --force leaves the previous result intact

def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_failing_force_keeps_the_good_knn_and_features(tmp_path, capsys):
    from cedm import data

    data.run(tmp_path, "digits", limit=60)
    assert _cli(capsys, "features", "--run-dir", str(tmp_path))[0] == 0
    assert _cli(capsys, "knn", "--run-dir", str(tmp_path), "--k", "5")[0] == 0
    rd = RunDir(tmp_path)
    knn, feats = _snapshot(rd.knn), _snapshot(rd.features)
    rc, err = _cli(capsys, "knn", "--run-dir", str(tmp_path), "--k", "120", "--force")
    assert rc == 2 and "need at least k+1 points" in err
    assert _snapshot(rd.knn) == knn
    rc, err = _cli(capsys, "features", "--run-dir", str(tmp_path), "--backbone", "no_such_net", "--force")
    assert rc == 2 and "unknown backbone" in err
    assert _snapshot(rd.features) == feats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "features", "knn"]   # no leftovers
    assert "skipped" in _cli(capsys, "knn", "--run-dir", str(tmp_path), "--k", "5")[1]


def test_failing_forced_training_keeps_the_finished_model(tmp_path, monkeypatch):
    make_run(tmp_path)
    train.run(tmp_path, "temi-C5", mimg=24e-6, **SMALL)
    out = tmp_path / "train/temi-C5"
    before = _snapshot(out)
    monkeypatch.setattr(train.ops, "edm_loss", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        train.run(tmp_path, "temi-C5", mimg=24e-6, force=True, **SMALL)
    assert _snapshot(out) == before


def test_a_killed_forced_extension_resumes_when_run_again(tmp_path):
    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    train.run(tmp_path / "a", "temi-C5", mimg=48e-6, **SMALL)                # 6 steps straight
    train.run(tmp_path / "b", "temi-C5", mimg=16e-6, **SMALL)                # 2 steps, finished
    kw = dict(SMALL, mimg=48e-6, force=True, checkpoint_every_kimg=0.008)
    part = train.run(tmp_path / "b", "temi-C5", max_steps=4, **kw)           # killed redo at step 4
    assert part["stopped"] and json.loads((tmp_path / "b/train/temi-C5/network.json").read_text())["step"] == 2
    assert (tmp_path / "b/train/.temi-C5.redo/state.pt").exists()
    assert train.run(tmp_path / "b", "temi-C5", **kw)["step"] == 6           # resumed, not restarted
    _states_equal(torch.load(tmp_path / "a/train/temi-C5/state.pt", weights_only=True)["net"],
                  torch.load(tmp_path / "b/train/temi-C5/state.pt", weights_only=True)["net"])
    assert not (tmp_path / "b/train/.temi-C5.redo").exists()


# ----------------------------------------------------------------------------------------------
# Zero is a value, not "use the default"

def test_zero_flags_are_errors_not_defaults(tmp_path, capsys):
    make_run(tmp_path)
    base = ["--run-dir", str(tmp_path), "--device", "cpu"]
    rc, err = _cli(capsys, "train", *base, "--cond", "temi-C5", "--batch-size", "0")
    assert rc == 2 and "--batch-size" in err and not (tmp_path / "train").exists()
    rc, err = _cli(capsys, "train", *base, "--cond", "temi-C5", "--checkpoint-every-kimg", "0")
    assert rc == 2 and "--checkpoint-every-kimg must be positive" in err
    assert train.run(tmp_path, "temi-C5", mimg=8e-6, **SMALL)["nimg"] == 8
    rc, err = _cli(capsys, "sample", *base, "--cond", "temi-C5", "--num", "0")
    assert rc == 2 and "--num must be >= 1 (got 0)" in err and not (tmp_path / "sample").exists()
    save_array(tmp_path / "features/features.npy", np.ones((48, 3), np.float32))
    write_manifest(tmp_path / "features", "features", {"backbone": "synthetic"})
    save_array(tmp_path / "knn/knn.npy", np.zeros((48, 2), np.int64))
    write_manifest(tmp_path / "knn", "knn", {"k": 2})
    rc, err = _cli(capsys, "cluster", *base, "--method", "temi", "--clusters", "3", "--heads", "0")
    assert rc == 2 and "--heads must be at least 1, got 0" in err
    rc, err = _cli(capsys, "knn", *base, "--k", "0")
    assert rc == 2 and "--k must be at least 1, got 0" in err


# ----------------------------------------------------------------------------------------------
# Torn files: one-line errors; stale temp files are removed

def test_truncated_artifact_is_a_one_line_error(tmp_path, capsys):
    rd = make_run(tmp_path)
    save_array(rd.features / "features.npy", np.ones((48, 8), np.float32))
    write_manifest(rd.features, "features", {"backbone": "synthetic"})
    f = rd.features / "features.npy"
    f.write_bytes(f.read_bytes()[:300])                                   # torn, manifest intact
    rc, err = _cli(capsys, "knn", "--run-dir", str(tmp_path), "--k", "3")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "features.npy" in err and "truncated or corrupt" in err
    with pytest.raises(CedmError, match="truncated or corrupt"):
        load_array(f)


def test_corrupt_training_state_is_a_one_line_error(tmp_path, capsys):
    make_run(tmp_path)
    out = tmp_path / "train/temi-C5"
    out.mkdir(parents=True)
    (out / "state.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    rc, err = _cli(capsys, "train", "--run-dir", str(tmp_path), "--cond", "temi-C5", "--network", "tiny",
                   "--batch-size", "8", "--mimg", "8e-6", "--device", "cpu")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "cannot read training state" in err and "--force" in err


def test_stale_temp_files_of_a_killed_checkpoint_write_are_removed(tmp_path):
    make_run(tmp_path)
    kw = dict(SMALL, mimg=32e-6, checkpoint_every_kimg=0.008)
    train.run(tmp_path, "temi-C5", max_steps=2, **kw)                    # killed after step 2
    out = tmp_path / "train/temi-C5"
    torn = [out / ".state.pt.k1ll3d.tmp", out / ".network.safetensors.x.safetensors.tmp"]
    for t in torn:
        t.write_bytes(b"half a file")
    stray = tmp_path / "train/.temi-C5.abc.tmp"                          # a killed staging folder
    stray.mkdir()
    assert train.run(tmp_path, "temi-C5", **kw)["step"] == 4
    assert not any(t.exists() for t in torn) and not stray.exists()
    assert not list(out.rglob("*.tmp"))


def test_stage_folders_record_inputs_relative_to_the_run_root(tmp_path):
    """A run directory moved elsewhere keeps its identities (Argo pods mount it anywhere)."""
    import shutil

    make_run(tmp_path / "a")
    train.run(tmp_path / "a", "temi-C5", mimg=8e-6, **SMALL)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    os.utime(tmp_path / "moved/train/temi-C5/manifest.json")
    mtime = (tmp_path / "moved/train/temi-C5/network.safetensors").stat().st_mtime_ns
    train.run(tmp_path / "moved", "temi-C5", mimg=8e-6, **SMALL)         # skipped, not redone
    assert (tmp_path / "moved/train/temi-C5/network.safetensors").stat().st_mtime_ns == mtime


def test_evaluate_declares_the_uncond_samples_it_reads(tmp_path, capsys):
    """uFID reads sample/uncond: when those samples appear (or change), evaluate redoes, never reuses."""
    from cedm import data, evaluate, features

    data.run(tmp_path, "digits", limit=40)
    features.run(tmp_path)
    rd = RunDir(tmp_path)
    imgs = load_array(rd.data / "images.npy")

    def fake_samples(tag, offset):
        d = rd.sample(tag)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "images.npz", images=np.roll(imgs, offset, axis=0)[:20], clusters=np.zeros(20, np.int64))
        write_manifest(d, "sample", {"cond": tag, "offset": offset})

    fake_samples("labels", 1)
    kw = dict(metric="backbone", sets=1, num=10, device="cpu")
    m = evaluate.run(tmp_path, "labels", **kw)
    assert "ufid" not in m
    assert evaluate.run(tmp_path, "labels", **kw) == m                    # skipped: same inputs
    fake_samples("uncond", 5)
    m2 = evaluate.run(tmp_path, "labels", **kw)
    assert "ufid" in m2 and "inputs changed" in capsys.readouterr().err
    man = json.loads((rd.eval("labels") / "manifest.json").read_text())
    assert {"sample/labels", "sample/uncond", "data", "features"} <= set(man["inputs"])


def test_results_are_readable_like_any_output(tmp_path, monkeypatch):
    """Atomic writes keep the modes a plain open()/mkdir give (0666/0777 less the umask), not
    mkstemp's 0600 / mkdtemp's 0700: a report or stage folder is readable by the group and others."""
    import stat

    import cedm.io as cio

    monkeypatch.setattr(cio, "UMASK", 0o022)
    cio.save_json(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(cio.temp_dir(tmp_path, ".stage.").stat().st_mode) == 0o755
    monkeypatch.setattr(cio, "UMASK", 0o077)                    # a private umask stays private
    cio.save_json(tmp_path / "b.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------------------------
# The integrity record of a folder of many files (docs/performance.md#integrity)

def test_a_folder_of_many_files_records_every_size_and_hashes_a_bounded_sample(tmp_path, monkeypatch):
    """`sample --png` or a balanced image folder holds tens of thousands of PNGs: writing and
    checking its record is one stat per file plus at most 2 x MANY fingerprints (its top-level
    files, and MANY of the others evenly spaced), not a read of every file."""
    monkeypatch.setattr(pipeline, "MANY", 8)
    rng = np.random.default_rng(0)

    def stage(work, _):
        np.save(work / "images.npy", rng.integers(0, 255, (50, 4), np.uint8))
        (work / "grid.png").write_bytes(rng.bytes(300))
        for c in range(3):                                     # like balanced/<cond>/<class>/<seed>.png
            (work / "png" / f"{c:05d}").mkdir(parents=True)
            for i in range(20):
                (work / "png" / f"{c:05d}" / f"{i:06d}.png").write_bytes(rng.bytes(100 + i))
        (work / "png" / "00000" / "skip.tmp").write_bytes(b"stale")      # never recorded
        return pipeline.Output({"images": "images.npy", "png": "png/"})

    out = tmp_path / "run" / "sample" / "x"
    st = pipeline.Stage("sample", out, tmp_path / "run", {"n": 1})
    pipeline.execute(st, stage, quiet=True)
    files = json.loads((out / "manifest.json").read_text())[pipeline.FILES]
    pngs = sorted(r for r in files if r.startswith("png/"))
    assert len(pngs) == 60 and "png/00000/skip.tmp" not in files
    assert all(files[r][0] == (out / r).stat().st_size for r in files)             # every size
    hashed = [r for r in pngs if len(files[r]) == 2]
    assert len(files["images.npy"]) == len(files["grid.png"]) == 2                 # the top level: all
    at = [pngs.index(r) for r in hashed]                                           # evenly spaced, ends included
    assert len(at) == 8 and at[0] == 0 and at[-1] == 59 and {b - a for a, b in zip(at, at[1:])} <= {8, 9}
    assert all(files[r] == pipeline.fingerprint(out / r) for r in hashed)

    reads = []
    real = pipeline.fingerprint
    monkeypatch.setattr(pipeline, "fingerprint", lambda p: reads.append(p) or real(p))
    assert pipeline.damage(out) is None and len(reads) == 10                       # 2 + MANY, not 62

    unhashed = out / next(r for r in pngs if len(files[r]) == 1)
    good = unhashed.read_bytes()
    unhashed.write_bytes(good[:-1])                                                # a truncated PNG
    assert pipeline.damage(out) == f"{unhashed.relative_to(out).as_posix()} is {len(good) - 1} bytes, " \
                                   f"but {len(good)} were written"
    unhashed.unlink()
    assert pipeline.damage(out).endswith("is missing")
    unhashed.write_bytes(good)
    sampled = out / hashed[3]
    b = bytearray(sampled.read_bytes())
    b[0] ^= 0xFF
    sampled.write_bytes(bytes(b))                                                  # same size, other bytes
    assert pipeline.damage(out) == f"{hashed[3]} is not the file that was written (same size, other bytes)"
    # a redo seeded from this result (an extension) leaves the damaged file out
    seeded = tmp_path / "seeded"
    pipeline._seed(out, seeded)
    assert not (seeded / hashed[3]).exists() and (seeded / unhashed.relative_to(out)).read_bytes() == good
    # and the stage redoes it rather than skipping it
    sampled.write_bytes(bytes(b))
    calls = []
    pipeline.execute(st, lambda w, d: calls.append(d.reason) or stage(w, d), quiet=True)
    assert calls and calls[0].startswith("it is damaged") and pipeline.damage(out) is None


def test_a_folder_of_few_files_hashes_every_one(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(5):
        (tmp_path / "sub" / f"{i}.bin").write_bytes(bytes([i]) * 10)
    (tmp_path / "a.npy").write_bytes(b"x" * 3)
    files = pipeline.file_records(tmp_path)
    assert list(files) == ["a.npy", *(f"sub/{i}.bin" for i in range(5))]
    assert all(v == pipeline.fingerprint(tmp_path / r) for r, v in files.items())
