"""EDM Heun sampler (EDM Algorithm 2; docs/method.md#sampler) and the sample stage."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from cedm import sample, train
from cedm.io import CedmError, RunDir, save_array, save_json, write_manifest
from test_bad_input import rerecord


pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(root, n=32, C=5, empty=(2,), res=16):
    """data/ (digits preset) + cluster/temi-C<C>/ with cluster(s) `empty` unused."""
    rng = np.random.default_rng(0)
    rd = RunDir(root)
    used = [c for c in range(C) if c not in empty]
    assign = np.asarray([used[i % len(used)] for i in range(n)], dtype=np.int64)
    save_array(rd.data / "images.npy", rng.integers(0, 255, size=(n, res, res, 3)).astype(np.uint8))
    write_manifest(rd.data, "data", {"dataset": "digits", "resolution": res, "num_classes": 10})
    cdir = rd.cluster("temi", C)
    save_array(cdir / "assignments.npy", assign)
    save_json(cdir / "summary.json", {"q": (np.bincount(assign, minlength=C) / n).tolist()})
    write_manifest(cdir, "cluster", {"method": "temi", "clusters": C})
    return rd


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real (2-step) C-EDM checkpoint for temi-C5 with 4 non-empty clusters, and an uncond one."""
    root = tmp_path_factory.mktemp("run")
    make_run(root)
    kw = dict(network="tiny", batch_size=8, mimg=16e-6, p_uncond=0.1, progress=False)
    train.run(root, "temi-C5", snapshot_every_mimg=8e-6, **kw)     # EMA snapshots at 8 and 16 images
    train.run(root, "uncond", **kw)
    net, meta = sample.load_network(root / "train/temi-C5")
    # Make the zero-initialised output layer non-trivial so the images depend on everything.
    with torch.no_grad():
        torch.manual_seed(0)
        net.model.dec["16x16_aux_conv"].weight.normal_(0, 0.05)
    return root, net, meta


# ----------------------------------------------------------------------------------------------
# Algorithm 2 against a plain re-implementation

def _plain_heun(D, n, N=18, s_min=0.002, s_max=80.0, rho=7.0, churn=0.0, S_min=0.0, S_max=math.inf,
                S_noise=1.0, noises=None):
    """EDM Algorithm 2 (docs/method.md#sampler), line by line, in numpy float64. Returns x_N and the list of D calls."""
    t = [(s_max ** (1 / rho) + i / (N - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(N)]
    t.append(0.0)
    x = n * t[0]
    calls, noises = [], list(noises or [])
    for i in range(N):
        gamma = min(churn / N, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        t_hat = t[i] * (1 + gamma)
        x_hat = x + math.sqrt(t_hat**2 - t[i] ** 2) * S_noise * noises.pop(0) if gamma > 0 else x
        calls.append(t_hat)
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            calls.append(t[i + 1])
            d2 = (x_next - D(x_next, t[i + 1])) / t[i + 1]
            x_next = x_hat + (t[i + 1] - t_hat) * (d + d2) / 2
        x = x_next
    return x, calls


def _gauss_D(x, t, sd=0.5):
    """The exact denoiser of data ~ N(0, sd^2): D(x; t) = x sd^2 / (t^2 + sd^2)."""
    return x * (sd * sd / (t * t + sd * sd))


def test_time_steps_formula():
    t = sample.time_steps(18, 0.002, 80, 7).numpy()
    i = np.arange(18)
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(t[:-1], ref, rtol=1e-12)
    assert t[-1] == 0 and math.isclose(t[0], 80) and math.isclose(t[17], 0.002)
    assert np.all(np.diff(t) < 0)


@pytest.mark.parametrize("churn", [dict(), dict(churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.007)])
def test_sampler_matches_paper_step_by_step(churn):
    rng = np.random.default_rng(0)
    n = rng.standard_normal((3, 3, 4, 4))
    noises = [rng.standard_normal(n.shape) for _ in range(18)]
    D = lambda x, t: x * (0.3 / (t * t + 0.3)) + 0.1 * np.tanh(x)        # toy analytic denoiser
    ref, ref_calls = _plain_heun(D, n, noises=noises, **churn)

    calls, queue = [], [torch.from_numpy(z) for z in noises]

    def denoise(x, t):
        calls.append(t)
        return torch.from_numpy(D(x.numpy(), t))

    out = sample.edm_sampler(denoise, torch.from_numpy(n), 18, S_churn=churn.get("churn", 0.0),
                             S_min=churn.get("S_min", 0.0), S_max=churn.get("S_max", math.inf),
                             S_noise=churn.get("S_noise", 1.0), randn_like=lambda x: queue.pop(0))
    assert len(calls) == 35 == len(ref_calls)                           # 2N - 1 evaluations
    np.testing.assert_allclose(calls, ref_calls, rtol=1e-12)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-9)
    if churn:
        assert len(queue) < 18 and calls[0] == pytest.approx(sample.time_steps()[0].item())  # S_max < t_0
        assert any(c > t for c, t in zip(calls[2::2], sample.time_steps()[1:].tolist()))  # some t_hat > t_i


def test_sampler_with_exact_denoiser_converges_at_second_order():
    """Data N(0, 0.5^2): the probability-flow ODE maps x_0 = n t_0 to n sd t_0 / sqrt(t_0^2 + sd^2).

    Heun is second order: the error falls ~16x when the steps go from 50 to 200.
    """
    n = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[:, None, None, None]
    exact = 0.5 * 80 / math.sqrt(80**2 + 0.25)
    err = {N: (sample.edm_sampler(_gauss_D, n, N) / n - exact).abs().max().item() for N in (18, 50, 200)}
    assert err[18] < 0.06 and err[50] < 0.005
    assert 10 < err[50] / err[200] < 25, err


# ----------------------------------------------------------------------------------------------
# Generation with a trained checkpoint

def test_images_depend_only_on_their_seed(trained):
    _, net, meta = trained
    kw = dict(steps=4, churn=5.0, progress=False)
    a = sample.generate(net, meta, 6, seed_base=10, batch_size=6, **kw)
    b = sample.generate(net, meta, 6, seed_base=10, batch_size=2, **kw)
    c = sample.generate(net, meta, 3, seed_base=13, batch_size=3, **kw)
    for k in ("images", "labels", "clusters", "seeds"):
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k][3:], c[k])
    assert a["images"].shape == (6, 16, 16, 3) and a["images"].dtype == np.uint8
    np.testing.assert_array_equal(a["seeds"], np.arange(10, 16))
    assert len({im.tobytes() for im in a["images"]}) == 6
    np.testing.assert_array_equal(np.asarray(meta["raw_labels"])[a["labels"]], a["clusters"])


def test_label_choices(trained):
    _, net, meta = trained
    assert meta["raw_labels"] == [0, 1, 3, 4] and meta["label_dim"] == 4
    skewed = dict(meta, q=[0.94, 0.02, 0.02, 0.02])
    kw = dict(steps=1, progress=False, batch_size=400)
    prior = sample.generate(net, skewed, 400, labels="prior", **kw)["labels"]
    assert 0.88 < (prior == 0).mean() < 0.99
    uni = sample.generate(net, skewed, 400, labels="uniform", **kw)["labels"]
    assert all(60 < (uni == i).sum() < 140 for i in range(4))
    fixed = sample.generate(net, meta, 5, labels="3", **kw)
    assert (fixed["labels"] == 2).all() and (fixed["clusters"] == 3).all()
    # Same seed, same label draw, whatever the batch.
    np.testing.assert_array_equal(prior[100:110], sample.generate(net, skewed, 10, seed_base=100, **kw)["labels"])


def test_label_mismatch_is_a_clear_error(trained):
    _, net, meta = trained
    with pytest.raises(CedmError, match=r"--labels 37.*label_dim 4.*ids 0, 1, 3, 4"):
        sample.generate(net, meta, 2, labels="37", steps=1, progress=False)
    with pytest.raises(CedmError, match=r"--labels 2"):                   # the empty cluster
        sample.generate(net, meta, 2, labels=2, steps=1, progress=False)
    with pytest.raises(CedmError, match="prior"):
        sample.generate(net, meta, 2, labels="most", steps=1, progress=False)


def test_stage_refuses_a_checkpoint_of_another_conditioning(trained, tmp_path):
    root, _, _ = trained
    shutil.copytree(root / "data", tmp_path / "data")
    shutil.copytree(root / "cluster/temi-C5", tmp_path / "cluster/temi-C5")
    shutil.copytree(root / "train/temi-C5", tmp_path / "train/temi-C20")
    with pytest.raises(CedmError, match=r"checkpoint for 'temi-C5' \(C=5, label_dim 4\), not for 'temi-C20'"):
        sample.run(tmp_path, "temi-C20", num=2, steps=1, progress=False)
    # The clustering changed after training (now 5 non-empty clusters): refuse.
    shutil.copytree(root / "train/temi-C5", tmp_path / "train/temi-C5")
    save_array(tmp_path / "cluster/temi-C5/assignments.npy", np.arange(32) % 5)
    with pytest.raises(CedmError, match="now has 5 non-empty clusters.*trained on 4"):
        sample.run(tmp_path, "temi-C5", num=2, steps=1, progress=False)
    with pytest.raises(CedmError, match="no finished training"):
        sample.run(tmp_path, "kmeans-C5", num=2, steps=1, progress=False)


def test_classifier_free_guidance_combines_cond_and_null(trained):
    _, net, meta = trained
    w = 1.5

    class Guided(torch.nn.Module):   # D(x|c) with guidance folded in: (1+w) D(x|c) - w D(x|0)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, sigma, labels):
            return (1 + w) * net(x, sigma, labels) - w * net(x, sigma, torch.zeros_like(labels))

    kw = dict(steps=3, progress=False)
    a = sample.generate(net, meta, 4, guidance=w, **kw)
    b = sample.generate(Guided(), meta, 4, guidance=0.0, **kw)
    np.testing.assert_allclose(a["images"].astype(int), b["images"].astype(int), atol=1)
    assert not np.array_equal(a["images"], sample.generate(net, meta, 4, **kw)["images"])
    _, umeta = sample.load_network(trained[0] / "train/uncond")
    with pytest.raises(CedmError, match="unconditional"):
        sample.generate(net, umeta, 2, guidance=1.0, **kw)


def test_sample_stage_outputs_skip_and_cli(trained, tmp_path):
    root, _, _ = trained
    for d in ("data", "cluster", "train"):
        shutil.copytree(root / d, tmp_path / d)
    from cedm.cli import main

    assert main(["sample", "--run-dir", str(tmp_path), "--cond", "temi-C5", "--num", "7", "--steps", "2",
                 "--png", "--batch-size", "3", "--seed-base", "5"]) == 0
    out = tmp_path / "sample/temi-C5"
    z = np.load(out / "images.npz", allow_pickle=False)
    assert set(z.files) == {"images", "labels", "clusters", "seeds"}
    assert z["images"].shape == (7, 16, 16, 3) and z["labels"].dtype == np.int64
    np.testing.assert_array_equal(z["seeds"], np.arange(5, 12))
    assert sorted(p.name for p in (out / "png").iterdir())[0] == "000005.png" and len(list((out / "png").iterdir())) == 7
    from PIL import Image

    rows = len(np.unique(z["labels"]))
    grid = Image.open(out / "grid.png")
    from cedm.images import MIN_CELL, PAD

    assert grid.height == rows * (-(-MIN_CELL // 16) * 16 + PAD) + PAD   # one row per cluster, enlarged
    mtime = (out / "images.npz").stat().st_mtime_ns
    sample.run(tmp_path, "temi-C5", num=7, steps=2, png=True, seed_base=5, progress=False)   # skipped
    assert (out / "images.npz").stat().st_mtime_ns == mtime
    assert main(["sample", "--run-dir", str(tmp_path), "--cond", "temi-C5", "--num", "8", "--steps", "2"]) == 2
    assert main(["sample", "--run-dir", str(tmp_path), "--cond", "temi-C5", "--labels", "37", "--num", "2",
                 "--force"]) == 2
    # The uncond model: a single row, label 0.
    assert main(["sample", "--run-dir", str(tmp_path), "--cond", "uncond", "--num", "3", "--steps", "2"]) == 0
    z = np.load(tmp_path / "sample/uncond/images.npz")
    assert (z["labels"] == 0).all()


def test_save_grid_one_row_per_label(tmp_path):
    from PIL import Image

    imgs = np.zeros((10, 8, 8, 3), np.uint8)
    imgs[:, :, :, 0] = np.arange(10)[:, None, None] * 20
    labels = np.array([3, 1, 3, 1, 1, 7, 3, 3, 1, 1])
    from cedm.images import MIN_CELL, PAD

    sample.save_grid(imgs, labels, tmp_path / "g.png", max_cols=4)
    g = np.asarray(Image.open(tmp_path / "g.png"))
    cell = -(-MIN_CELL // 8) * 8                      # 8-px images enlarged to at least MIN_CELL
    assert g.shape[:2] == (3 * (cell + PAD) + PAD, 4 * (cell + PAD) + PAD)
    # Row 0 is label 1 (images 1, 3, 4, 8), row 2 is label 7 (image 5 only, then blank).
    px = lambda r, c: g[PAD + r * (cell + PAD) + 1, PAD + c * (cell + PAD) + 1, 0]
    assert [px(0, c) for c in range(4)] == [20, 60, 80, 160]
    assert px(2, 0) == 100 and px(2, 1) == 255


def test_bf16_channels_last_sampling_is_close_to_fp32(trained):
    """--precision bf16 runs the network in bf16 autocast and channels_last (the Heun steps stay
    float64): the images are those of fp32 up to bf16 rounding, and the caller's net is untouched."""
    _, net, meta = trained
    kw = dict(steps=4, progress=False, batch_size=4)
    a = sample.generate(net, meta, 4, seed_base=3, **kw)
    b = sample.generate(net, meta, 4, seed_base=3, precision="bf16", **kw)
    diff = np.abs(a["images"].astype(int) - b["images"].astype(int))
    assert diff.mean() < 2.0 and (diff > 0).any()        # bf16 changed something, not much
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert all(p.is_contiguous() for p in net.parameters())
    with pytest.raises(CedmError, match="precision"):
        sample.generate(net, meta, 1, precision="fp8", **kw)


@pytest.mark.slow
def test_compiled_sampler_matches_eager(trained):
    """--compile (torch.compile of the network; CUDA graphs on a GPU) gives the eager images up
    to float rounding (the compiled kernels may reorder sums)."""
    _, net, meta = trained
    kw = dict(steps=3, progress=False, batch_size=4)
    a = sample.generate(net, meta, 4, seed_base=5, **kw)
    b = sample.generate(net, meta, 4, seed_base=5, compile=True, **kw)
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1


def test_sampler_flags_derive_from_the_typed_config():
    from dataclasses import fields

    from cedm.cli import build_parser
    from cedm.config import SAMPLER

    sub = [a for a in build_parser()._actions if a.dest == "command"][0]
    acts = {a.dest: a for a in sub.choices["sample"]._actions}
    for f in fields(SAMPLER):
        if f.name in ("steps", "steps_64"):     # N by the model's resolution: None, shown in the help
            assert acts["steps"].default is None and str(getattr(SAMPLER, f.name)) in acts["steps"].help
            continue
        assert acts[f.name].default == getattr(SAMPLER, f.name), f.name
    assert sample.time_steps()[0] == SAMPLER.sigma_max and len(sample.time_steps()) == SAMPLER.steps + 1


def test_default_steps_follow_the_resolution(trained, tmp_path):
    """N defaults to 18 up to 32 px and 40 at 64x64 (EDM's settings); --steps overrides. The resolved N
    is the stage config, so a 16-px run sampled with the default is the same stage as --steps 18."""
    from cedm.config import SAMPLER
    from cedm.io import MANIFEST, load_json

    assert [SAMPLER.steps_for(r) for r in (16, 32, 64)] == [18, 18, 40]
    meta64 = {"network_kwargs": {"img_resolution": 64}}
    assert sample.sampler_steps(meta64) == 40 and sample.sampler_steps(meta64, 7) == 7
    assert sample.sampler_steps({"network_kwargs": {"img_resolution": 32}}) == 18
    root, _, _ = trained
    for d in ("data", "cluster", "train"):
        shutil.copytree(root / d, tmp_path / d)
    out = sample.run(tmp_path, "uncond", num=1, steps=18, progress=False)
    assert load_json(out / MANIFEST)["config"]["steps"] == 18
    mtime = (out / "images.npz").stat().st_mtime_ns
    sample.run(tmp_path, "uncond", num=1, progress=False)                 # default: same config, skipped
    assert (out / "images.npz").stat().st_mtime_ns == mtime
    with pytest.raises(CedmError, match="steps"):                         # another N is another config
        sample.run(tmp_path, "uncond", num=1, steps=2, progress=False)


def test_uniform_ablation_sits_beside_the_q_samples(trained, tmp_path):
    """The paper's Table 4: the same model sampled with uniform labels, in sample/<cond>@uniform."""
    root, _, _ = trained
    for d in ("data", "cluster", "train"):
        shutil.copytree(root / d, tmp_path / d)
    sample.run(tmp_path, "temi-C5", num=6, steps=2, progress=False)
    sample.run(tmp_path, "temi-C5", num=6, steps=2, progress=False, ablation="uniform")
    q = np.load(tmp_path / "sample/temi-C5/images.npz")
    u = np.load(tmp_path / "sample/temi-C5@uniform/images.npz")
    assert json.loads((tmp_path / "sample/temi-C5@uniform/manifest.json").read_text())["config"]["labels"] == "uniform"
    want = sample.generate(*sample.load_network(tmp_path / "train/temi-C5"), 6, labels="uniform", steps=2,
                           progress=False)
    np.testing.assert_array_equal(u["labels"], want["labels"])
    np.testing.assert_array_equal(q["seeds"], u["seeds"])
    with pytest.raises(CedmError, match="drop --labels"):
        sample.run(tmp_path, "temi-C5", num=6, labels="3", ablation="uniform", progress=False)
    with pytest.raises(CedmError, match="unknown --ablation"):
        sample.run(tmp_path, "temi-C5", num=6, ablation="gamma1", progress=False)


# ----------------------------------------------------------------------------------------------
# The default precision: training's device rule for the model's preset (docs/performance.md)

def _native_bf16(monkeypatch, native: bool):
    """Pretend this CPU has (or lacks) native bf16: the one detection TrainConfig.precision_for reads."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)


def _as_preset(run_root, cond, network):
    """Relabel a copied checkpoint's network preset in network.json (the weights stay the tiny
    ones): the sampling default is chosen by the preset's name, so a small network can stand in
    for a CIFAR one."""
    path = RunDir(run_root).train(cond) / "network.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(dict(meta, network=network)))
    rerecord(path)
    return dict(meta, network=network)


@pytest.mark.parametrize("native", [True, False])
def test_default_precision_is_trainings_device_rule(trained, monkeypatch, native):
    """CUDA: fp16 (EDM's fp16 network); a CPU: bf16 only where it is native; the tiny preset
    (`cedm run`) fp32 everywhere, as it trains; and generate(precision=None) runs that choice."""
    from cedm.networks import train_preset

    _, net, meta = trained
    _native_bf16(monkeypatch, native)
    cifar = dict(meta, network="cifar")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sample.default_precision(cifar, cpu) == ("bf16" if native else "fp32")
    assert sample.default_precision(cifar, cuda) == "fp16"
    assert sample.default_precision(dict(meta, network="ffhq64"), cpu) == ("bf16" if native else "fp32")
    assert meta["network"] == "tiny"
    assert sample.default_precision(meta, cpu) == sample.default_precision(meta, cuda) == "fp32"
    for name in ("cifar", "ffhq64", "tiny"):      # the same answer as training's rule, for every preset
        for dev in (cpu, cuda):
            assert sample.default_precision(dict(meta, network=name), dev) == train_preset(name).precision_for(dev)
    kw = dict(steps=3, progress=False, batch_size=4, seed_base=2)
    got = sample.generate(net, cifar, 4, **kw)["images"]
    want = sample.generate(net, meta, 4, precision="bf16" if native else "fp32", **kw)["images"]
    other = sample.generate(net, meta, 4, precision="fp32" if native else "bf16", **kw)["images"]
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, other)
    np.testing.assert_array_equal(sample.generate(net, cifar, 4, precision="fp32", **kw)["images"],
                                  sample.generate(net, meta, 4, precision="fp32", **kw)["images"])   # overrides
    with pytest.raises(CedmError, match="names no network preset.*--precision"):
        sample.default_precision({k: v for k, v in meta.items() if k != "network"}, cpu)


def test_bf16_images_depend_only_on_their_seed(trained):
    """The CPU determinism rule at the bf16 default too: same seed and config, same images,
    whatever the batch."""
    _, net, meta = trained
    kw = dict(steps=3, progress=False, precision="bf16")
    a = sample.generate(net, meta, 6, seed_base=4, batch_size=6, **kw)
    b = sample.generate(net, meta, 6, seed_base=4, batch_size=2, **kw)
    c = sample.generate(net, meta, 6, seed_base=4, batch_size=6, **kw)
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["images"], c["images"])


def _copy_run(root, dst):
    for d in ("data", "cluster", "train"):
        shutil.copytree(root / d, dst / d)


def test_stage_records_the_precision_it_resolved_and_the_flag_overrides(trained, tmp_path, monkeypatch):
    from cedm.cli import main
    from cedm.io import MANIFEST, load_json

    root, _, _ = trained
    _copy_run(root, tmp_path)
    _native_bf16(monkeypatch, True)
    meta = _as_preset(tmp_path, "uncond", "cifar")
    args = ["sample", "--run-dir", str(tmp_path), "--cond", "uncond", "--num", "3", "--steps", "2"]
    assert main(args) == 0
    out = tmp_path / "sample/uncond"
    cfg = load_json(out / MANIFEST)["config"]
    assert (cfg["precision"], cfg["compile"]) == ("bf16", False)
    net, _ = sample.load_network(tmp_path / "train/uncond")
    np.testing.assert_array_equal(np.load(out / "images.npz")["images"],
                                  sample.generate(net, meta, 3, steps=2, precision="bf16", progress=False)["images"])
    # a CPU without native bf16 resolves to fp32: another config, refused by name, not reused
    _native_bf16(monkeypatch, False)
    assert main(args) == 2
    with pytest.raises(CedmError, match="differs in: precision"):
        sample.run(tmp_path, "uncond", num=3, steps=2, progress=False)
    # --precision overrides the default: bf16 asked for explicitly is the same stage (skipped)
    mtime = (out / "images.npz").stat().st_mtime_ns
    assert main(args + ["--precision", "bf16"]) == 0
    assert (out / "images.npz").stat().st_mtime_ns == mtime
    assert main(args + ["--precision", "fp32", "--force"]) == 0
    assert load_json(out / MANIFEST)["config"]["precision"] == "fp32"
    np.testing.assert_array_equal(np.load(out / "images.npz")["images"],
                                  sample.generate(net, meta, 3, steps=2, precision="fp32", progress=False)["images"])


def _make_legacy(out):
    """Rewrite a finished sample stage's manifest as cedm wrote it before the precision was
    recorded (fp32 eager: neither key in the config)."""
    from cedm.io import MANIFEST, load_json

    man = load_json(out / MANIFEST)
    assert man["config"].pop("precision") == "fp32" and man["config"].pop("compile") is False
    save_json(out / MANIFEST, man)


def test_a_sample_dir_made_before_the_precision_was_recorded(trained, tmp_path, monkeypatch):
    """It was made at fp32: reused where the default (or --precision) is fp32, refused with the
    reason and both ways out where it is not, redone by --force (which then records the key)."""
    from cedm.cli import main
    from cedm.io import MANIFEST, input_hash, load_json

    root, _, _ = trained
    _copy_run(root, tmp_path)
    out = sample.run(tmp_path, "uncond", num=3, steps=2, progress=False)   # tiny: fp32 by default
    _make_legacy(out)
    mtime = (out / "images.npz").stat().st_mtime_ns
    sample.run(tmp_path, "uncond", num=3, steps=2, progress=False)          # fp32 eager: the same stage
    assert (out / "images.npz").stat().st_mtime_ns == mtime
    with pytest.raises(CedmError, match="differs in: num"):                 # other keys still compared
        sample.run(tmp_path, "uncond", num=4, steps=2, progress=False)
    _native_bf16(monkeypatch, True)
    _as_preset(tmp_path, "uncond", "cifar")                                 # now the default is bf16
    man = load_json(out / MANIFEST)                     # the legacy samples count as made from it
    man["inputs"]["train/uncond"] = input_hash(RunDir(tmp_path).train("uncond"))
    save_json(out / MANIFEST, man)
    with pytest.raises(CedmError, match=r"before cedm recorded the sampling precision.*precision bf16.*"
                                        r"--precision fp32 to reuse it, or --force"):
        sample.run(tmp_path, "uncond", num=3, steps=2, progress=False)
    with pytest.raises(CedmError, match="compile True"):
        sample.run(tmp_path, "uncond", num=3, steps=2, precision="fp32", compile=True, progress=False)
    args = ["sample", "--run-dir", str(tmp_path), "--cond", "uncond", "--num", "3", "--steps", "2"]
    assert main(args) == 2
    assert main(args + ["--precision", "fp32"]) == 0                        # reused as it was made
    assert (out / "images.npz").stat().st_mtime_ns == mtime and "precision" not in load_json(out / MANIFEST)["config"]
    assert main(args + ["--force"]) == 0
    assert load_json(out / MANIFEST)["config"]["precision"] == "bf16"


# ----------------------------------------------------------------------------------------------
# Guidance: the interval, autoguidance and their combination, against a restatement in float64
# with exact Gaussian denoisers (docs/method.md#guidance)

class _GaussNet:
    """A network call net(x, sigma, labels) -> D in float64: the exact denoiser of data
    N(scale mu_c, sd^2) for a one-hot label c, of N(0, sd_null^2) for the null (zero) label.
    Records (sigma, batch) of every call."""

    def __init__(self, mus, sd=0.5, sd_null=0.8, scale=1.0):
        self.mus, self.sd, self.sd_null, self.scale, self.calls = mus, sd, sd_null, scale, []

    def __call__(self, x, sigma, labels):
        self.calls.append((float(sigma[0]), x.shape[0]))
        assert x.dtype == sigma.dtype == torch.float64 and (sigma == sigma[0]).all()
        m = self.scale * (labels @ self.mus)[:, :, None, None]
        sd = torch.where(labels.abs().sum(1) == 0, torch.tensor(self.sd_null, dtype=torch.float64),
                         torch.tensor(self.sd, dtype=torch.float64))[:, None, None, None]
        s = sigma[:, None, None, None]
        return m + (x - m) * sd**2 / (s**2 + sd**2)


def _gauss(x, t, mean, sd):
    return mean + (x - mean) * sd * sd / (t * t + sd * sd)


def _restated_guided(w, method, interval, mus, cls, guide_scale, guide_sd):
    """D_w(x; t) as docs/method.md#guidance states it, in numpy: (1+w) D(x|c) - w D_ref for t in
    (lo, hi] (every t without an interval), D(x|c) elsewhere; D_ref = D(x|null) (CFG) or the
    guide's D(x|c) (autoguidance)."""
    mean = mus.numpy()[cls][:, :, None, None]

    def D(x, t):
        d = _gauss(x, t, mean, 0.5)
        if interval is not None and not interval[0] < t <= interval[1]:
            return d
        ref = _gauss(x, t, 0.0, 0.8) if method == "cfg" else _gauss(x, t, guide_scale * mean, guide_sd)
        return (1 + w) * d - w * ref
    return D


@pytest.mark.parametrize("method,interval,churn", [
    ("cfg", None, False),
    ("cfg", (12, 3), False),            # (t_12, t_3]: both ends on evaluation points (lo excluded, hi included)
    ("auto", None, False),
    ("auto", (12, 3), True),            # their combination, with churn (t_hat off the grid)
])
def test_guided_sampler_matches_the_restated_formula(method, interval, churn):
    t = sample.time_steps().tolist()
    iv = (t[interval[0]], t[interval[1]]) if interval else None
    rng = np.random.default_rng(1)
    n = rng.standard_normal((4, 3, 2, 2))
    cls = np.array([0, 2, 1, 2])
    mus = torch.from_numpy(rng.standard_normal((3, 3)))
    labels = torch.nn.functional.one_hot(torch.from_numpy(cls), 3).to(torch.float64)
    noises = [rng.standard_normal(n.shape) for _ in range(18)]
    ch = dict(churn=30.0, S_min=0.05, S_max=20.0, S_noise=1.007) if churn else {}
    w = 1.7
    ref, ref_calls = _plain_heun(_restated_guided(w, method, iv, mus, cls, 0.6, 0.7), n, noises=noises, **ch)

    net = _GaussNet(mus)
    guide = _GaussNet(mus, sd=0.7, scale=0.6) if method == "auto" else None
    queue = [torch.from_numpy(z) for z in noises]
    denoise = sample.guided_denoiser(net, labels, w, iv, guide)
    out = sample.edm_sampler(denoise, torch.from_numpy(n), 18, S_churn=ch.get("churn", 0.0),
                             S_min=ch.get("S_min", 0.0), S_max=ch.get("S_max", math.inf),
                             S_noise=ch.get("S_noise", 1.0), randn_like=lambda x: queue.pop(0))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-9)
    inside = [s for s in ref_calls if iv is None or iv[0] < s <= iv[1]]
    assert 0 < len(inside) <= 35 and (iv is None or len(inside) < 35)
    if method == "cfg":     # one forward per evaluation: 2B (cond and null stacked) inside, B outside
        assert [b for _, b in net.calls] == [8 if (iv is None or iv[0] < s <= iv[1]) else 4 for s in ref_calls]
    else:                   # autoguidance: the guide only inside, B each
        assert len(net.calls) == 35 and {b for _, b in net.calls} == {4}
        np.testing.assert_allclose([s for s, _ in guide.calls], inside, rtol=1e-12)
    if iv is not None and not churn:                 # lo excluded, hi included
        assert t[interval[0]] in ref_calls and t[interval[0]] not in inside and t[interval[1]] in inside


def test_interval_bounds_are_checked():
    assert sample.parse_interval("0.28,5.42") == (0.28, 5.42)
    assert sample.parse_interval((0, 80)) == (0.0, 80.0) and sample.parse_interval(None) is None
    for bad in ("5,1", "-1,2", "0.1,100", "2,2", "nan,1"):
        with pytest.raises(CedmError, match=r"not inside \(0, sigma_max = 80\]"):
            sample.parse_interval(bad)
    with pytest.raises(CedmError, match=r"not inside \(0, sigma_max = 10\]"):
        sample.parse_interval("1,20", sigma_max=10)
    for bad in ("abc", "1", "1,2,3"):
        with pytest.raises(CedmError, match="LO,HI"):
            sample.parse_interval(bad)


class _Folded(torch.nn.Module):
    """A network with the guidance folded in: (1+w) net(x|c) - w ref(x|c') for sigma in (lo, hi],
    net(x|c) elsewhere; ref is `guide` (autoguidance) or net with the zero label (CFG)."""

    def __init__(self, net, w, interval=None, guide=None):
        super().__init__()
        self.net, self.guide, self.w, self.interval = net, guide, w, interval

    def forward(self, x, sigma, labels):
        d = self.net(x, sigma, labels)
        if self.interval is not None and not self.interval[0] < float(sigma[0]) <= self.interval[1]:
            return d
        ref = self.guide(x, sigma, labels) if self.guide is not None else self.net(x, sigma, torch.zeros_like(labels))
        return (1 + self.w) * d - self.w * ref


def test_autoguidance_and_interval_in_generate(trained):
    """generate with a guide (an earlier EMA snapshot) and an interval gives the images of a network
    with the same combination folded in; the interval (0.5, 50] of N = 3 guides the middle step only."""
    root, net, meta = trained
    gnet, info = sample.load_guide("snapshot:8e-6", root / "train/temi-C5", meta)
    assert info["guide"] == "snapshot" and info["nimg"] == 8
    kw = dict(steps=3, progress=False, seed_base=3)
    w, iv = 1.5, (0.5, 50.0)
    for guide, interval in ((gnet, None), (gnet, iv), (None, iv)):
        a = sample.generate(net, meta, 4, guidance=w, guide=guide, guidance_interval=interval, **kw)
        b = sample.generate(_Folded(net, w, interval, guide), meta, 4, **kw)
        np.testing.assert_allclose(a["images"].astype(int), b["images"].astype(int), atol=1)
    plain = sample.generate(net, meta, 4, **kw)["images"]
    auto = sample.generate(net, meta, 4, guidance=w, guide=gnet, **kw)["images"]
    cut = sample.generate(net, meta, 4, guidance=w, guide=gnet, guidance_interval=iv, **kw)["images"]
    assert not np.array_equal(auto, plain) and not np.array_equal(cut, auto) and not np.array_equal(cut, plain)
    # the unconditional model takes autoguidance (no labels needed), not CFG
    unet, umeta = sample.load_network(root / "train/uncond")
    ugnet = sample.build(umeta["network_kwargs"])
    ugnet.load_state_dict(unet.state_dict())
    sample.generate(unet, umeta, 2, guidance=1.0, guide=ugnet.eval(), **kw)


def test_guidance_bad_input_is_one_line(trained, tmp_path):
    root, net, meta = trained
    kw = dict(steps=2, progress=False)
    with pytest.raises(CedmError, match="--guidance-interval does nothing without --guidance"):
        sample.generate(net, meta, 2, guidance_interval=(0.5, 5), **kw)
    with pytest.raises(CedmError, match="--guide does nothing without --guidance"):
        sample.generate(net, meta, 2, guide=net, **kw)
    with pytest.raises(CedmError, match=r"without label dropout \(p_uncond 0\).*--p-uncond 0.1 --force.*--guide"):
        sample.generate(net, dict(meta, p_uncond=0.0), 2, guidance=1.0, **kw)
    tdir = root / "train/temi-C5"
    with pytest.raises(CedmError, match=r"no snapshot at 0.5 Mimg \(it has 8e-06, 1.6e-05 Mimg\)"):
        sample.load_guide("snapshot:0.5", tdir, meta)
    with pytest.raises(CedmError, match="temi-C5 itself.*earlier snapshot"):
        sample.load_guide("snapshot:1.6e-5", tdir, meta)
    with pytest.raises(CedmError, match="itself"):
        sample.load_guide(str(tdir), tdir, meta)
    with pytest.raises(CedmError, match=r"kept no snapshots"):
        sample.load_guide("snapshot:0.1", root / "train/uncond", sample.load_network(root / "train/uncond")[1])
    # another label set: the unconditional model, and a model of other clusters with the same ids
    with pytest.raises(CedmError, match=r"another label set \('uncond', label_dim 0\) than 'temi-C5'"):
        sample.load_guide(str(root / "train/uncond"), tdir, meta)
    other = tmp_path / "other"
    shutil.copytree(tdir, other)
    gm = json.loads((other / "network.json").read_text())
    (other / "network.json").write_text(json.dumps(dict(gm, q=[0.7, 0.1, 0.1, 0.1])))
    with pytest.raises(CedmError, match="another label set"):
        sample.load_guide(str(other), tdir, meta)
    # other images: resolution, channels
    for key, val, what in (("img_resolution", 8, "8x8 images with 3 channels"),
                           ("img_channels", 1, "16x16 images with 1 channels")):
        nk = dict(gm["network_kwargs"], **{key: val})
        (other / "network.json").write_text(json.dumps(dict(gm, network_kwargs=nk)))
        with pytest.raises(CedmError, match=f"makes {what}, but temi-C5 makes 16x16 images with 3 channels"):
            sample.load_guide(str(other), tdir, meta)
    with pytest.raises(CedmError, match="not a trained model directory"):
        sample.load_guide(str(tmp_path / "nowhere"), tdir, meta)


def test_sample_stage_records_guide_and_interval(trained, tmp_path):
    """The stage config holds the interval and the guide (and its training images) when given; the
    images are generate's; another guide is another config; bad flags exit 2 with one line."""
    from cedm.cli import main
    from cedm.io import MANIFEST, load_json

    root, _, _ = trained
    _copy_run(root, tmp_path)
    args = ["sample", "--run-dir", str(tmp_path), "--cond", "temi-C5", "--num", "3", "--steps", "3"]
    assert main(args + ["--guidance", "1.5", "--guidance-interval", "0.5,50", "--guide", "snapshot:8e-6"]) == 0
    out = tmp_path / "sample/temi-C5@auto1.5-i0.5_50-snap8e-06"    # beside the plain set (sampler_variant)
    assert not (tmp_path / "sample/temi-C5").exists()
    man = load_json(out / MANIFEST)
    assert man["config"]["guidance_interval"] == [0.5, 50.0]
    assert (man["config"]["guide"], man["config"]["guide_nimg"]) == ("snapshot", 8)
    assert any("snapshots/ema-" in k for k in man["inputs"])
    net, meta = sample.load_network(tmp_path / "train/temi-C5")
    gnet, _ = sample.load_guide("snapshot:8e-6", tmp_path / "train/temi-C5", meta)
    want = sample.generate(net, meta, 3, steps=3, guidance=1.5, guidance_interval=(0.5, 50), guide=gnet,
                           progress=False)
    np.testing.assert_array_equal(np.load(out / "images.npz")["images"], want["images"])
    with pytest.raises(CedmError, match="differs in: steps"):          # the same setting's folder, another config
        sample.run(tmp_path, "temi-C5", num=3, steps=4, guidance=1.5, guidance_interval="0.5,50",
                   guide="snapshot:8e-6", progress=False)
    for bad in (["--guidance-interval", "0,90"], ["--guide", "snapshot:3"], ["--oversample", "0", "--filter", "msp"],
                ["--oversample", "2"]):
        assert main(args + ["--guidance", "1", "--force"] + bad) == 2, bad
    assert load_json(out / MANIFEST)["run_id"] == man["run_id"]      # a failing redo kept the result
    assert main(args + ["--balance", "--guidance", "1", "--guide", "snapshot:8e-6"]) == 2   # --balance: CFG only
    # the plain set is its own folder: made without --force, the guided set untouched
    assert main(args) == 0 and (tmp_path / "sample/temi-C5" / MANIFEST).exists()
    assert load_json(out / MANIFEST)["run_id"] == man["run_id"]
    # a stage made before these flags existed is the same stage as one without them (no new keys)
    assert main(["sample", "--run-dir", str(tmp_path), "--cond", "uncond", "--num", "2", "--steps", "2"]) == 0
    assert not {"guide", "guidance_interval", "oversample", "filter"} & set(
        load_json(tmp_path / "sample/uncond" / MANIFEST)["config"])


def test_sampler_variant_names_each_guided_or_filtered_set():
    """Guided and filtered sets are kept beside the plain sample/<cond> under a name that says the
    setting (docs/method.md#guidance); the plain sampler has none."""
    snap, model = {"guide": "snapshot", "nimg": 50_000}, {"guide": "/r/train/temi-C5", "nimg": 200_000}
    assert sample.sampler_variant(0.0, None, None, 1, None) is None
    assert sample.sampler_variant(0.3, None, {"guide": "snapshot", "nimg": 50_048}, 1, None) == "auto0.3-snap0.05"
    assert sample.sampler_variant(0.3, None, None, 1, None) == "cfg0.3"
    assert sample.sampler_variant(0.3, (0.28, 5.42), None, 1, None) == "cfg0.3-i0.28_5.42"
    assert sample.sampler_variant(1.0, None, snap, 1, None) == "auto1-snap0.05"
    assert sample.sampler_variant(1.0, (0.5, 50.0), model, 1, None) == "auto1-i0.5_50-model0.2"
    assert sample.sampler_variant(0.0, None, None, 4, "msp") == "mspx4"
    assert sample.sampler_variant(0.3, None, snap, 2, "cluster") == "auto0.3-snap0.05-clusterx2"
