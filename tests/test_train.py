"""C-EDM training: conditioning, augmentation, loss, resume, DDP (docs/method.md#c-edm; EDM Table 7)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cedm import train
from cedm.augment import SYM6, AugmentPipe
from cedm.io import CedmError, RunDir, load_tensors, save_array, save_json, write_manifest

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(root, n=48, C=5, empty=(2,), res=16, seed=0, q=None):
    """A run directory with data/ (digits-preset manifest) and cluster/temi-C<C>/ (cluster `empty` unused)."""
    rng = np.random.default_rng(seed)
    rd = RunDir(root)
    used = [c for c in range(C) if c not in empty]
    assign = np.asarray([used[i % len(used)] for i in range(n)], dtype=np.int64)
    # Images: a coloured square whose position depends on the cluster, plus noise.
    imgs = rng.integers(0, 40, size=(n, res, res, 3)).astype(np.uint8)
    for i, c in enumerate(assign):
        o = (c * 3) % (res - 6)
        imgs[i, o:o + 6, o:o + 6, c % 3] = 220
    save_array(rd.data / "images.npy", imgs)
    save_array(rd.data / "labels.npy", np.arange(n, dtype=np.int64) % 3)
    write_manifest(rd.data, "data", {"dataset": "digits", "resolution": res, "num_classes": 10})
    cdir = rd.cluster("temi", C)
    save_array(cdir / "assignments.npy", assign)
    counts = np.bincount(assign, minlength=C)
    save_json(cdir / "summary.json", {"q": list(q) if q is not None else (counts / n).tolist(),
                                      "r_c": len(used) / C})
    write_manifest(cdir, "cluster", {"method": "temi", "clusters": C})
    return rd


SMALL = dict(network="tiny", batch_size=8, lr=2e-3, lr_ramp_mimg=0.0001, progress=False)


def _states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# Conditioning

def test_conditioning_remaps_non_empty_clusters_and_uses_summary_q(tmp_path):
    q = [0.1, 0.2, 0.0, 0.3, 0.4]
    make_run(tmp_path, C=5, empty=(2,), q=q)
    c = train.conditioning(tmp_path, "temi-C5", 48)
    assert c["label_dim"] == 4 and c["raw_labels"] == [0, 1, 3, 4]
    assert c["label_map"] == {"0": 0, "1": 1, "3": 2, "4": 3}
    np.testing.assert_allclose(c["q"], [0.1, 0.2, 0.3, 0.4])
    raw = np.load(tmp_path / "cluster/temi-C5/assignments.npy")
    np.testing.assert_array_equal(np.asarray(c["raw_labels"])[c["index"]], raw)


def test_conditioning_labels_uncond_and_single_cluster(tmp_path):
    make_run(tmp_path, C=5, empty=(0, 1, 2, 3))
    assert train.conditioning(tmp_path, "temi-C5", 48)["label_dim"] == 0      # C^u = 1: unconditional
    c = train.conditioning(tmp_path, "labels", 48)
    assert c["label_dim"] == 3 and c["kind"] == "labels"
    u = train.conditioning(tmp_path, "uncond", 48)
    assert u["label_dim"] == 0 and u["q"] == [1.0] and (u["index"] == 0).all()


def test_conditioning_errors(tmp_path):
    make_run(tmp_path)
    with pytest.raises(CedmError, match="unknown --cond"):
        train.parse_tag("temi_C5")
    with pytest.raises(CedmError, match="no clustering"):
        train.conditioning(tmp_path, "kmeans-C5", 48)
    with pytest.raises(CedmError, match="labels for 40 images"):
        train.conditioning(tmp_path, "temi-C5", 40)
    (tmp_path / "data/labels.npy").unlink()
    with pytest.raises(CedmError, match="unlabeled"):
        train.conditioning(tmp_path, "labels", 48)


# ----------------------------------------------------------------------------------------------
# Data order and per-step randomness

def test_data_order_is_epoch_permutations_and_rank_slices_cover_the_batch():
    order = train.DataOrder(10, 4, seed=3)
    stream = np.concatenate([order.indices(s) for s in range(5)])        # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    again = train.DataOrder(10, 4, seed=3)
    np.testing.assert_array_equal(again.indices(3), order.indices(3))   # random access = same
    assert not np.array_equal(train.DataOrder(10, 4, seed=4).indices(0), order.indices(0))


def test_batches_slice_per_rank(tmp_path):
    imgs = np.arange(10, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    save_array(tmp_path / "images.npy", imgs)
    order = train.DataOrder(10, 4, seed=0)
    parts = [train._Batches(tmp_path / "images.npy", np.arange(10) * 10, order, r, 2)[3] for r in range(2)]
    whole = train._Batches(tmp_path / "images.npy", np.arange(10) * 10, order, 0, 1)[3]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole[0])
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), whole[1])
    np.testing.assert_array_equal(whole[0][:, 0, 0, 0].numpy() * 10, whole[1].numpy())


def test_step_seed_depends_only_on_its_inputs():
    assert train.step_seed(0, 5) == train.step_seed(0, 5)
    assert len({train.step_seed(0, s) for s in range(100)} | {train.step_seed(1, 0)}) == 101
    assert 0 <= train.step_seed(2**40, 3, 1) < 2**63


# ----------------------------------------------------------------------------------------------
# Augmentation (EDM AugmentPipe, 9 labels)

def test_sym6_is_the_orthonormal_symlet():
    h = np.asarray(SYM6)
    assert math.isclose(h.sum(), math.sqrt(2), rel_tol=1e-12) and math.isclose((h**2).sum(), 1, rel_tol=1e-9)
    for k in range(1, 6):                                    # orthogonal to its even shifts
        assert abs((h[:-2 * k] * h[2 * k:]).sum()) < 1e-9
    g, n = h[::-1] * (-1.0) ** np.arange(12), np.arange(12.0)
    for m in range(6):                                       # 6 vanishing moments of the high-pass
        assert abs((g * n**m).sum()) < 1e-6 * 12**m


def test_augment_off_is_identity_with_zero_labels():
    pipe = AugmentPipe(p=0.0, xflip=0)
    x = torch.rand(5, 3, 16, 16)
    y, lab = pipe(x, pipe.draw(5, torch.Generator().manual_seed(0)))
    assert torch.equal(y, x) and lab.shape == (5, 9) and not lab.any()


def test_augment_geometry_translation_rotation_flip():
    pipe = AugmentPipe(p=0.0, xflip=0)
    x = torch.rand(2, 3, 16, 16)
    prm = pipe.draw(2, torch.Generator().manual_seed(0))
    prm["translate"] = torch.tensor([[1 / (16 * 0.125)] * 2, [0.0, 0.0]])   # +1 pixel in x
    y, lab = pipe(x, prm)
    torch.testing.assert_close(y[..., 2:-2, 3:-2], x[..., 2:-2, 2:-3], atol=1e-5, rtol=0)
    torch.testing.assert_close(lab[:, 7], torch.full((2,), 0.5))            # label = the N(0,1) draw
    # A quarter turn of a smooth image is rot90 up to the sym6 resampling (not linear-phase).
    i = torch.arange(16.0)
    X, Y = torch.meshgrid(i, i, indexing="xy")
    smooth = torch.stack([torch.sin(X / 3) + torch.cos(Y / 4), torch.sin((X + 2 * Y) / 5), X / 16])[None].repeat(2, 1, 1, 1)
    prm = pipe.draw(2, torch.Generator().manual_seed(0))
    prm["rotate"] = torch.full((2,), math.pi / 2)
    y, lab = pipe(smooth, prm)
    assert (y - torch.rot90(smooth, k=1, dims=(2, 3))).abs()[..., 3:-3, 3:-3].max() < 0.06
    assert (y - torch.rot90(smooth, k=3, dims=(2, 3))).abs()[..., 3:-3, 3:-3].max() > 1
    torch.testing.assert_close(lab[:, 3:5], torch.tensor([[-1.0, 1.0]] * 2), atol=1e-6, rtol=0)
    prm = pipe.draw(2, torch.Generator().manual_seed(0))
    prm["xflip"] = torch.tensor([1, 0])
    y, lab = pipe(x, prm)
    assert torch.equal(y[0], x[0].flip(2)) and torch.equal(y[1], x[1]) and lab[:, 0].tolist() == [1, 0]


def test_augment_rate_and_batch_independence():
    pipe = AugmentPipe(p=0.12)
    prm = pipe.draw(4000, torch.Generator().manual_seed(1))
    assert abs(prm["xflip"].float().mean() - 0.5) < 0.03      # xflip=1e8: always a coin flip (EDM)
    assert abs((prm["scale"] != 0).float().mean() - 0.12) < 0.02
    x = torch.rand(12, 3, 16, 16)
    prm = AugmentPipe(p=0.5).draw(12, torch.Generator().manual_seed(2))
    y, lab = pipe(x, prm)
    parts = [pipe(x[a:b], AugmentPipe.slice(prm, a, b)) for a, b in ((0, 5), (5, 12))]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), y, atol=1e-6, rtol=0)
    assert torch.equal(torch.cat([p[1] for p in parts]), lab)


# ----------------------------------------------------------------------------------------------
# Training loop

def test_train_writes_checkpoint_loadable_without_pickle_and_skips(tmp_path, monkeypatch):
    make_run(tmp_path)
    meta = train.run(tmp_path, "temi-C5", mimg=24e-6, **SMALL)        # 3 steps
    out = tmp_path / "train/temi-C5"
    assert meta["nimg"] == 24 and meta["label_dim"] == 4 and meta["label_map"]["3"] == 2
    assert {"network.safetensors", "network.json", "state.pt", "log.jsonl", "manifest.json"} <= \
        {p.name for p in out.iterdir()}
    saved = json.loads((out / "network.json").read_text())
    assert saved["raw_labels"] == [0, 1, 3, 4] and saved["resolution"] == 16 and saved["nimg"] == 24
    state = torch.load(out / "state.pt", weights_only=True)              # no arbitrary pickles
    _states_equal(load_tensors(out / "network.safetensors"), state["ema"])
    assert state["step"] == 3 and state["data"]["position"] == 24
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and {"loss", "img_per_s", "mimg", "lr"} <= set(log[-1])

    import pickle

    from cedm.sample import load_network

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    net, m = load_network(out)
    _states_equal(net.state_dict(), state["ema"])
    monkeypatch.undo()

    mtime = (out / "network.safetensors").stat().st_mtime_ns
    train.run(tmp_path, "temi-C5", mimg=24e-6, **SMALL)                 # finished: skipped
    assert (out / "network.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(CedmError, match="different config.*lr"):
        train.run(tmp_path, "temi-C5", mimg=24e-6, **dict(SMALL, lr=1e-3))


def test_ctrl_c_during_the_final_checkpoint_stops_after_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the last checkpoint is written: it is completed, then the run stops
    (KeyboardInterrupt; `cedm run` must not go on to the next stage as if nothing happened), and
    the same command finishes the stage from that checkpoint without another step."""
    import signal

    from cedm import training_loop

    make_run(tmp_path)
    out = tmp_path / "train/temi-C5"
    real = training_loop.save_checkpoint

    def ctrl_c_inside(out_, net, ema, meta, state):
        if meta["step"] == 3:                            # the final checkpoint of 3 steps
            signal.raise_signal(signal.SIGINT)           # a real SIGINT, to the real handler
        real(out_, net, ema, meta, state)

    monkeypatch.setattr(training_loop, "save_checkpoint", ctrl_c_inside)
    with pytest.raises(KeyboardInterrupt):
        train.run(tmp_path, "temi-C5", mimg=24e-6, **SMALL)                # 3 steps
    err = capsys.readouterr().err
    assert "saving a checkpoint after this step" in err
    assert f"saved; interrupted: the state after all 3 steps is in {out / 'state.pt'}" in err
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 3 and not (out / "manifest.json").exists()
    monkeypatch.setattr(training_loop, "save_checkpoint", real)
    assert train.run(tmp_path, "temi-C5", mimg=24e-6, **SMALL)["step"] == 3
    assert (out / "manifest.json").exists()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_lr_ramp_and_ema_follow_edm(tmp_path):
    """Step 0 has lr 0 (ramp from nimg = 0) and EMA beta 0 (half-life ramp 0.05 nimg = 0)."""
    make_run(tmp_path)
    train.run(tmp_path, "temi-C5", mimg=8e-6, augment_p=0.0, **dict(SMALL, lr_ramp_mimg=1.0))
    st = torch.load(tmp_path / "train/temi-C5/state.pt", weights_only=True)
    _states_equal(st["ema"], st["net"])          # beta = 0.5 ** (B / 1e-8) = 0: EMA = weights
    with torch.random.fork_rng():
        torch.manual_seed(0)
        from cedm.networks import build

        init = build(st["config"]["network_kwargs"]).state_dict()
    _states_equal(st["net"], init)               # lr = 0 on the first step: weights unchanged
    assert st["optimizer"]["state"]              # ... but Adam's moments were updated


def test_nonfinite_gradients_are_replaced_and_counted(tmp_path, monkeypatch):
    make_run(tmp_path)
    real = train.ops.edm_loss
    calls = []

    def poisoned(*a, **k):
        loss = real(*a, **k)
        calls.append(1)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train.ops, "edm_loss", poisoned)
    from cedm import telemetry

    counted = []   # counted on the device, reported at log time (no host sync per step)
    monkeypatch.setattr(telemetry, "train_nonfinite_step", lambda c, skipped: counted.append(skipped))
    train.run(tmp_path, "temi-C5", mimg=24e-6, **SMALL)
    st = torch.load(tmp_path / "train/temi-C5/state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in st["net"].values())
    log = [json.loads(line) for line in (tmp_path / "train/temi-C5/log.jsonl").read_text().splitlines()]
    assert sum(r["nonfinite"] for r in log) == 1
    assert counted == [False]                    # fp32: a real non-finite step, not an fp16 skip


def test_precision_defaults_per_device(tmp_path):
    """fp16 is a GPU setting: on a CPU the CIFAR preset trains in bf16 where the CPU has it
    natively, else fp32; the tiny preset in fp32 everywhere; the run records what it used."""
    from cedm.networks import train_preset

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    cifar, tiny = train_preset("cifar"), train_preset("tiny")
    assert cifar.precision_for(torch.device("cuda")) == "fp16"
    assert cifar.precision_for(torch.device("cpu")) == ("bf16" if native else "fp32")
    assert tiny.precision_for(torch.device("cuda")) == tiny.precision_for("cpu") == "fp32"
    make_run(tmp_path)
    meta = train.run(tmp_path, "temi-C5", mimg=8e-6, **SMALL)          # precision left to the preset
    assert meta["precision"] == "fp32"


def test_ema_update_is_edm_lerp_and_memory_format_by_device():
    from cedm.networks import memory_format
    from cedm.training_loop import ema_update

    g = torch.Generator().manual_seed(0)
    net = [torch.randn(4, 3, 3, 3, generator=g), torch.randn(7, generator=g)]
    ema = [torch.randn(4, 3, 3, 3, generator=g).contiguous(memory_format=torch.channels_last),
           torch.randn(7, generator=g)]
    want = [p_net.lerp(p_ema, 0.9) for p_ema, p_net in zip(ema, net)]   # EDM: p_net.lerp(p_ema, beta)
    ema_update(ema, net, 0.9)
    for w, e in zip(want, ema):
        torch.testing.assert_close(e, w, rtol=1e-6, atol=1e-6)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory_format(cpu, "fp32") == torch.contiguous_format
    assert memory_format(cpu, "bf16") == memory_format(cuda, "fp32") == torch.channels_last


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps(tmp_path, precision):
    make_run(tmp_path)
    meta = train.run(tmp_path, "temi-C5", mimg=16e-6, precision=precision, **SMALL)
    st = torch.load(tmp_path / "train/temi-C5/state.pt", weights_only=True)
    assert meta["precision"] == precision and all(torch.isfinite(v).all() for v in st["net"].values())
    assert bool(st["scaler"]) == (precision == "fp16")                   # GradScaler for fp16 only


@pytest.mark.slow
def test_loss_decreases_on_a_tiny_dataset(tmp_path):
    """A few hundred steps on 8 images: the fixed-noise EDM loss of the EMA net drops well below init."""
    make_run(tmp_path, n=8, C=2, empty=())
    meta = train.run(tmp_path, "temi-C2", mimg=150 * 8e-6, augment_p=0.0, **SMALL)
    from cedm import ops
    from cedm.networks import build
    from cedm.sample import load_network

    net, _ = load_network(tmp_path / "train/temi-C2")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        init = build(meta["network_kwargs"]).eval()
    y = torch.from_numpy(np.load(tmp_path / "data/images.npy")).permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    y = y.repeat(8, 1, 1, 1)
    sigma = (torch.randn(len(y), generator=g) * 1.2 - 1.2).exp()
    x = y + torch.randn(y.shape, generator=g) * sigma[:, None, None, None]
    lab = torch.nn.functional.one_hot(torch.arange(8).repeat(8) % 2, 2).float()
    with torch.no_grad():
        before = ops.edm_loss(x, init(x, sigma, lab, return_F=True), y, sigma).mean().item()
        after = ops.edm_loss(x, net(x, sigma, lab, return_F=True), y, sigma).mean().item()
    log = [json.loads(line)["loss"] for line in (tmp_path / "train/temi-C2/log.jsonl").read_text().splitlines()]
    print(f"fixed-noise loss: init {before:.1f} -> trained {after:.1f}")
    assert after < 0.5 * before, (before, after)
    assert np.mean(log[-5:]) < np.mean(log[:5])


@pytest.mark.slow
def test_resume_after_interruption_is_exact(tmp_path):
    """Stop mid-run (work past the last checkpoint is lost), run again: identical to uninterrupted."""
    # ckpt every 10 steps; augmentation on (the digits preset has it off) so its draws resume too
    kw = dict(SMALL, mimg=30 * 8e-6, checkpoint_every_kimg=0.08, p_uncond=0.2, augment_p=0.12)
    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    train.run(tmp_path / "a", "temi-C5", **kw)
    part = train.run(tmp_path / "b", "temi-C5", max_steps=17, **kw)
    assert part["stopped"] and part["step"] == 17
    st = torch.load(tmp_path / "b/train/temi-C5/state.pt", weights_only=True)
    assert st["step"] == 10 and not (tmp_path / "b/train/temi-C5/manifest.json").exists()
    train.run(tmp_path / "b", "temi-C5", **kw)
    a = torch.load(tmp_path / "a/train/temi-C5/state.pt", weights_only=True)
    b = torch.load(tmp_path / "b/train/temi-C5/state.pt", weights_only=True)
    _states_equal(a["net"], b["net"])
    _states_equal(a["ema"], b["ema"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _states_equal(sa, sb)
    la = (tmp_path / "a/train/temi-C5/log.jsonl").read_text().splitlines()
    lb = (tmp_path / "b/train/temi-C5/log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in la] == [json.loads(x)["loss"] for x in lb]


def _cli(run_dir, *extra):
    return [sys.executable, "-m", "cedm", "train", "--run-dir", str(run_dir), "--cond", "temi-C5",
            "--network", "tiny", "--batch-size", "8", "--mimg", str(20 * 8e-6), "--lr", "2e-3",
            "--lr-ramp-mimg", "0.0001", "--checkpoint-every-kimg", "0.032", "--augment-p", "0.12",
            "--device", "cpu", *extra]


_CLI_KW = dict(network="tiny", batch_size=8, mimg=20 * 8e-6, lr=2e-3, lr_ramp_mimg=0.0001,
               checkpoint_every_kimg=0.032, augment_p=0.12, device="cpu", progress=False)   # as _cli


def _env():
    # Same thread settings as this process, so a subprocess computes bit-identically.
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                TQDM_DISABLE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_to_identical_weights(tmp_path):
    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    train.run(tmp_path / "a", "temi-C5", **_CLI_KW)                      # uninterrupted, in-process
    proc = subprocess.Popen(_cli(tmp_path / "b"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "b/train/temi-C5/state.pt"
    t0 = time.time()
    while not state.exists() and proc.poll() is None and time.time() - t0 < 60:
        time.sleep(0.02)
    time.sleep(0.05)                                                     # somewhere between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b/train/temi-C5/manifest.json").exists(), "finished before the kill"
    r = subprocess.run(_cli(tmp_path / "b"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    _states_equal(load_tensors(tmp_path / "a/train/temi-C5/network.safetensors"),
                  load_tensors(tmp_path / "b/train/temi-C5/network.safetensors"))
    from cedm.cli import main

    assert main(_cli(tmp_path / "b", "--lr", "1e-3")[3:]) == 2           # another config: exit 2


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """torchrun, 2 processes (gloo), global batch 8 split 4+4 == 1 process with batch 8.

    Not bitwise: DDP averages the two half-batch gradients (sum over 4, all-reduce, /2) where one
    process sums over 8, so float32 rounding differs (~1e-7 relative). Adam divides by sqrt(v),
    which turns rounding noise into lr-sized steps for parameters whose true gradient is ~0
    (e.g. the attention key bias: softmax ignores it), so weights are compared at 1e-4 and the
    denoiser outputs (which those parameters do not affect) tightly; a wrong data split, label or
    noise draw moves weights by ~lr per step (1e-3) and outputs far more.
    """
    make_run(tmp_path / "one")
    make_run(tmp_path / "two")
    kw = dict(_CLI_KW, mimg=10 * 8e-6, p_uncond=0.25)
    train.run(tmp_path / "one", "temi-C5", **kw)
    args = _cli(tmp_path / "two", "--mimg", str(10 * 8e-6), "--p-uncond", "0.25")[3:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "cedm", *args], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "one/train/temi-C5/state.pt", weights_only=True)
    b = torch.load(tmp_path / "two/train/temi-C5/state.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    from cedm.networks import build

    nets = []
    for st in (a, b):
        net = build(st["config"]["network_kwargs"]).eval()
        net.load_state_dict(st["net"])
        nets.append(net)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        init = build(a["config"]["network_kwargs"]).eval()
    diff = max((b["net"][k] - a["net"][k]).abs().max().item() for k in a["net"])
    moved = max((init.state_dict()[k] - a["net"][k]).abs().max().item() for k in a["net"])
    assert diff < 1e-4 and moved > 100 * diff, (diff, moved)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(6, 3, 16, 16, generator=g), torch.tensor([0.01, 0.1, 0.5, 1, 5, 50.0])
    lab = torch.eye(4)[[0, 1, 2, 3, 0, 1]]
    with torch.no_grad():
        outs = [n(x, sigma, lab, return_F=True) for n in (*nets, init)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert (outs[2] - outs[0]).abs().max() > 100 * (outs[1] - outs[0]).abs().max()


def test_cli_help_documents_every_flag():
    from cedm.cli import build_parser

    sub = [a for a in build_parser()._actions if a.dest == "command"][0]
    p = sub.choices["train"]
    for a in p._actions:
        if a.option_strings and a.dest != "help":
            assert a.help, a.option_strings
    flags = {s for a in p._actions for s in a.option_strings}
    assert {"--cond", "--network", "--mimg", "--batch-size", "--lr", "--lr-ramp-mimg", "--ema-halflife-mimg",
            "--p-uncond", "--augment-p", "--precision", "--checkpoint-every-kimg", "--metrics-port",
            "--workers"} <= flags


def test_workers_do_not_change_the_result_and_metrics_are_served(tmp_path):
    import socket
    import urllib.request

    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train.run(tmp_path / "a", "temi-C5", mimg=24e-6, **SMALL)
    train.run(tmp_path / "b", "temi-C5", mimg=24e-6, workers=1, metrics_port=port, **SMALL)
    _states_equal(load_tensors(tmp_path / "a/train/temi-C5/network.safetensors"),
                  load_tensors(tmp_path / "b/train/temi-C5/network.safetensors"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    import re

    assert re.search(r'cedm_train_images_total\{[^}]*clusters="5"', text)
    assert re.search(r'cedm_train_target_images\{[^}]*clusters="5"[^}]*\} 24\.0', text)


def test_force_with_a_larger_budget_extends_exactly_and_force_otherwise_restarts(tmp_path):
    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    train.run(tmp_path / "a", "temi-C5", mimg=40e-6, **SMALL)               # 5 steps straight
    train.run(tmp_path / "b", "temi-C5", mimg=24e-6, **SMALL)               # 3 steps, finished
    with pytest.raises(CedmError, match="differs in: mimg"):
        train.run(tmp_path / "b", "temi-C5", mimg=40e-6, **SMALL)
    meta = train.run(tmp_path / "b", "temi-C5", mimg=40e-6, force=True, **SMALL)   # extended: 3 -> 5
    assert meta["step"] == 5
    _states_equal(load_tensors(tmp_path / "a/train/temi-C5/network.safetensors"),
                  load_tensors(tmp_path / "b/train/temi-C5/network.safetensors"))
    log = [json.loads(x)["step"] for x in (tmp_path / "b/train/temi-C5/log.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)) and log[-1] == 5
    meta = train.run(tmp_path / "b", "temi-C5", mimg=16e-6, force=True, **SMALL)   # smaller: restart
    assert meta["step"] == 2


def test_edm_loss_is_the_weighted_denoising_error():
    """EDMLoss = lambda(sigma) ||D(y + sigma n; sigma) - y||^2 summed over pixels (EDM Table 1)."""
    from cedm.loss import EDMLoss

    class Zero(torch.nn.Module):          # F = 0, so D = c_skip x
        def forward(self, x, sigma, labels=None, aug=None, return_F=False):
            assert return_F
            return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    y, n = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    fn = EDMLoss()
    sigma = fn.sigma(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    torch.testing.assert_close(sigma, torch.exp(torch.tensor([-1.0, 0.0, 0.5, 2.0]) * 1.2 - 1.2))
    s, sd = sigma[:, None, None, None], 0.5
    x = y + n * s
    lam = (s**2 + sd**2) / (s * sd) ** 2
    want = (lam * (sd**2 / (s**2 + sd**2) * x - y) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(fn(Zero(), y, sigma, n), want, rtol=1e-5, atol=1e-5)


def test_digits_preset_trains_without_augmentation_unless_asked(tmp_path):
    """Flips and rotations change a digit: the digits preset's augment_p is 0 (docs/method.md#augmentation);
    the flag still turns it on, and other presets keep the network preset's EDM value."""
    make_run(tmp_path)
    meta = train.run(tmp_path, "uncond", mimg=8e-6, **SMALL)
    assert meta["augment_p"] == 0.0 and meta["network_kwargs"]["augment_dim"] == 0
    meta = train.run(tmp_path, "labels", mimg=8e-6, augment_p=0.12, **SMALL)
    assert meta["augment_p"] == 0.12 and meta["network_kwargs"]["augment_dim"] == 9
    from cedm.config import PRESETS

    assert PRESETS["digits"].augment_p == 0.0
    assert all(PRESETS[n].augment_p is None for n in ("cifar10", "cifar100", "ffhq64"))


@pytest.mark.parametrize("preset,res,overrides", [("tiny", 16, {}),
                                                  ("cifar", 32, {"model_channels": 32, "num_blocks": 1})])
def test_bf16_autocast_keeps_the_loss_and_its_gradient(preset, res, overrides):
    """The CPU default where bf16 is native (bf16 autocast + channels_last) must train the same
    model: on one batch, the EDM loss agrees with fp32 to 1e-3 and the gradient points the same way."""
    import copy

    from cedm.loss import EDMLoss
    from cedm.networks import autocast, build, memory_format, network_kwargs

    torch.manual_seed(0)
    net = build(network_kwargs(preset, res, 10, **overrides)).train()
    aux = next(m for n, m in net.model.dec.items() if n.endswith("aux_conv"))
    torch.nn.init.normal_(aux.weight, std=0.02)                  # zero-initialised: make F count
    g = torch.Generator().manual_seed(1)
    y = torch.rand(32, 3, res, res, generator=g) * 2 - 1
    noise = torch.randn(32, 3, res, res, generator=g)
    loss_fn = EDMLoss()
    sigma = loss_fn.sigma(torch.randn(32, generator=g))
    labels = torch.nn.functional.one_hot(torch.arange(32) % 10, 10).float()
    cpu, out = torch.device("cpu"), {}
    for precision in ("fp32", "bf16"):
        fmt = memory_format(cpu, precision)
        n = copy.deepcopy(net).to(memory_format=fmt)
        loss = loss_fn(n, y.contiguous(memory_format=fmt), sigma, noise.contiguous(memory_format=fmt),
                       labels, autocast=autocast(cpu, precision))
        loss.mean().backward()
        out[precision] = loss.detach(), torch.cat([p.grad.flatten() for p in n.parameters()
                                                   if p.grad is not None])
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert not torch.equal(l16, l32)                              # bf16 really ran
    assert abs(l16.mean() / l32.mean() - 1) < 1e-3
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99
