"""cedm.evaluate: Fréchet distances through torch-fidelity, fallbacks, 1-NN AUROC, the stage."""
import numpy as np
import pytest
import torch

from cedm import evaluate
from cedm.io import CedmError, RunDir, load_json


def digits_run(root, limit: int = 40):
    """A run with the digits data and pixel features, and its training images (uint8)."""
    from cedm import data, features
    from cedm.io import load_array

    data.run(root, "digits", limit=limit)
    features.run(root)
    return RunDir(root), load_array(RunDir(root).data / "images.npy")


def fake_samples(rd, cond: str, images, ablation=None) -> None:
    """sample/<cond>[@ablation] holding `images`, as `cedm sample` leaves it."""
    from cedm.io import write_manifest

    d = rd.sample(cond, ablation)
    d.mkdir(parents=True)
    n = len(images)
    np.savez(d / "images.npz", images=images, clusters=np.zeros(n, np.int64), seeds=np.arange(n))
    write_manifest(d, "sample", {"cond": cond, "ablation": ablation})


def _stats(x):
    return evaluate.feature_statistics(x)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_of_two_sets_positive():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(loc=0.5, size=(400, 16))
    assert abs(evaluate.frechet_distance(_stats(a), _stats(a))) < 1e-6
    d = evaluate.frechet_distance(_stats(a), _stats(b))
    # ||mu_a - mu_b||^2 is about 16 * 0.25 = 4; the covariances match, so FD is about 4.
    assert 3.0 < d < 5.0


def test_frechet_distance_grows_with_the_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8))
    d = [evaluate.frechet_distance(_stats(a), _stats(a + s)) for s in (0.1, 0.5, 1.0)]
    assert d[0] < d[1] < d[2]


def test_one_nn_auroc_tells_copies_from_outliers():
    rng = np.random.default_rng(0)
    real = lambda n: np.concatenate([rng.normal(size=(n, 5)), 0.05 * rng.normal(size=(n, 5))], 1)
    train, held = real(500), real(100)
    # Off the data manifold in cosine terms: directions the data never takes.
    far = np.concatenate([0.05 * rng.normal(size=(100, 5)), rng.normal(size=(100, 5))], 1)
    copies = train[:100] + 1e-4 * rng.normal(size=(100, 10))  # memorised training images
    assert evaluate.one_nn_auroc(train, far, held) > 0.9
    assert evaluate.one_nn_auroc(train, copies, held) < 0.1


@pytest.mark.slow
def test_inception_path_of_torch_fidelity_with_a_local_weight_file(inception_weights_file):
    path = inception_weights_file
    ext = evaluate.inception_extractor(str(path), torch.device("cpu"))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 3, 0, 255).astype(np.uint8)   # darker images
    fa, fb = ext(a), ext(b)
    assert fa.shape == (24, 2048) and np.isfinite(fa).all()
    assert abs(evaluate.frechet_distance(_stats(fa), _stats(fa))) < 1e-3
    assert evaluate.frechet_distance(_stats(fa), _stats(fb)) > 1e-3


def test_missing_weights_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CEDM_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CedmError, match="no Inception-v3 weights"):
        evaluate.inception_extractor(None, torch.device("cpu"))
    with pytest.raises(CedmError, match="no such file"):
        evaluate.inception_extractor(str(tmp_path / "nope.pth"), torch.device("cpu"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CedmError, match="could not load Inception-v3 weights"):
        evaluate.inception_extractor(str(bad), torch.device("cpu"))
    with pytest.raises(CedmError, match="no DINOv2 weights"):
        evaluate.dinov2_extractor(None, torch.device("cpu"))


def test_fdd_preprocessing_is_pil_bicubic_to_224_then_imagenet_normalisation():
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 32, 24, 3), dtype=np.uint8)
    x = evaluate.dinov2_preprocess(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert x.shape == (3, 3, 224, 224)
    mean = 255 * np.array([0.485, 0.456, 0.406])
    std = 255 * np.array([0.229, 0.224, 0.225])
    for img, got in zip(imgs, x.numpy()):
        ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC)).astype(np.float64)
        np.testing.assert_allclose(got.transpose(1, 2, 0), (ref - mean) / std, atol=1e-4)
    # Not the bilinear resize it replaced: the two differ on such images.
    bil = np.asarray(Image.fromarray(imgs[0]).resize((224, 224), Image.BILINEAR)).astype(np.float64)
    assert np.abs(x[0].numpy().transpose(1, 2, 0) - (bil - mean) / std).max() > 0.1
    with pytest.raises(CedmError, match="uint8"):
        evaluate.dinov2_preprocess(torch.zeros(1, 3, 8, 8))


def test_the_dinov2_extractor_feeds_its_backbone_the_preprocessed_images():
    cls = evaluate._dinov2_class()
    ext = cls.__new__(cls)
    torch.nn.Module.__init__(ext)
    seen = []
    ext.model = lambda x: seen.append(x) or x.mean((2, 3))       # a backbone stand-in
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8))
    (out,) = ext(x)
    assert out.shape == (2, 3)
    torch.testing.assert_close(seen[0], evaluate.dinov2_preprocess(x))


def dgm_eval_subsample(n_images, nsample, seed=13579, sample_w_replacement=False):
    """dgm-eval's reference subsample (layer6ai-labs/dgm-eval, dgm_eval/dataloaders.py,
    DataLoader.subsample_dataset with its --seed default 13579), as its code reads. The reference is
    the first --path, loaded by get_dataloader_from_path's default sample_w_replacement=False
    (dgm_eval/__main__.py: only a generated path holding ':train' samples with replacement, and
    with seed + 1); the official eval_fdd.sh passes the dataset's zip there."""
    seed = seed + 1 if sample_w_replacement else seed
    np.random.seed(seed)  # for consistent subsampling of datasets across runs
    return sorted(np.random.choice(n_images, nsample, replace=sample_w_replacement))


@pytest.mark.parametrize("n_images, nsample", [(70_000, 50_000), (30, 12), (50_001, 50_000)])
def test_the_fdd_subsample_is_dgm_evals_indices(n_images, nsample):
    """FFHQ's 70,000 training images -> dgm-eval's 50,000, index for index (the earlier
    default_rng(0) draw shared 71.6% of them)."""
    state = np.random.get_state()
    got = evaluate.reference_subsample(n_images, nsample)
    assert evaluate.REF_SEED == 13579 and len(got) == nsample
    np.testing.assert_array_equal(got, dgm_eval_subsample(n_images, nsample))
    np.random.set_state(state)
    evaluate.reference_subsample(n_images, nsample)
    assert np.random.get_state()[1].tolist() == state[1].tolist()     # numpy's global state untouched


def test_reference_statistics_use_a_seeded_subsample_above_the_cap(tmp_path, monkeypatch):
    from cedm.io import RunDir, save_json

    rd = RunDir(tmp_path)
    rd.data.mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 256, size=(30, 4, 4, 3), dtype=np.uint8)
    np.save(rd.data / "images.npy", imgs)
    save_json(rd.data / "manifest.json", {"stage": "data"})
    seen = []

    def extractor(x):
        seen.append(np.asarray(x).copy())
        return np.asarray(x, np.float64).reshape(len(x), -1)[:, :6] + np.arange(6)

    monkeypatch.setattr(evaluate, "FDD_REF_MAX", 12)
    ref = evaluate.reference_statistics(tmp_path, "fdd", extractor, evaluate.FDD_REF_MAX)
    assert ref["n"] == 12 and len(seen[0]) == 12
    np.testing.assert_array_equal(seen[0], imgs[dgm_eval_subsample(30, 12)])
    # Cached under the cap and seed; a second call reads the cache, all images is another entry.
    again = evaluate.reference_statistics(tmp_path, "fdd", extractor, 12)
    assert len(seen) == 1 and again["n"] == 12 and np.array_equal(again["mu"], ref["mu"])
    full = evaluate.reference_statistics(tmp_path, "fdd", extractor, None)
    assert full["n"] == 30 and len(seen[1]) == 30
    assert evaluate.reference_statistics(tmp_path, "fdd", extractor, 50)["n"] == 30   # cap above N: all


def test_ufid_draws_the_uncond_set_from_seeds_the_conditional_set_does_not_use():
    imgs = np.arange(40, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    cond = {"images": imgs[:20], "seeds": np.arange(20)}
    uncond = {"images": imgs, "seeds": np.arange(40)}              # both from seed_base 0
    key, u = evaluate.ufid_uncond_images(cond, uncond, 10)
    assert key == "ufid" and list(u[:, 0, 0, 0]) == list(range(10, 20))
    # Too few uncond images with unused seeds: the shared seeds are in the metric's name.
    key, u = evaluate.ufid_uncond_images(cond, {"images": imgs[:15], "seeds": np.arange(15)}, 10)
    assert key == "ufid_shared_seeds" and list(u[:, 0, 0, 0]) == list(range(10))
    # Uncond sampled from another seed base: its first images are already independent.
    key, u = evaluate.ufid_uncond_images(cond, {"images": imgs[20:], "seeds": np.arange(100, 120)}, 10)
    assert key == "ufid" and list(u[:, 0, 0, 0]) == list(range(20, 30))


def test_evaluate_fdd_caps_the_reference_set_and_records_count_and_seed(tmp_path, monkeypatch):
    import json

    rd, imgs = digits_run(tmp_path)
    fake_samples(rd, "labels", imgs[:20])
    sizes = []

    def stand_in(x):                                            # a DINOv2 stand-in: pixel features
        sizes.append(len(x))
        return np.asarray(x, np.float32).reshape(len(x), -1)[:, :8]

    monkeypatch.setattr(evaluate, "choose_extractor", lambda *a: ("fdd", "FDD (stand-in)", stand_in, None))
    monkeypatch.setattr(evaluate, "FDD_REF_MAX", 25)
    m = evaluate.run(tmp_path, "labels", metric="fdd", sets=1, num=10, device="cpu")
    assert m["ref_images"] == 25 and m["ref_seed"] == evaluate.REF_SEED and sizes[0] == 25
    cfg = json.loads((rd.eval("labels") / "manifest.json").read_text())["config"]
    assert cfg["fdd_ref_max"] == 25 and cfg["ref_seed"] == evaluate.REF_SEED
    # Another cap is another identity: never the old result passed off as the new one.
    monkeypatch.setattr(evaluate, "FDD_REF_MAX", 30)
    with pytest.raises(CedmError, match="fdd_ref_max"):
        evaluate.run(tmp_path, "labels", metric="fdd", sets=1, num=10, device="cpu")
    assert evaluate.run(tmp_path, "labels", metric="fdd", sets=1, num=10, device="cpu",
                        force=True)["ref_images"] == 30


def test_the_report_names_a_shared_seed_ufid_as_such():
    from cedm import report

    head, rows = report.generation_rows({"clusters": {}, "sweep": {}, "eval": {
        "labels": {"mean": 1.0, "std": 0.0, "metric": "fid", "ufid_shared_seeds": 2.5},
        "temi-C5": {"mean": 1.0, "std": 0.0, "metric": "fid", "ufid": 3.25}}}, "fid")
    col = head.index("uFID")
    assert {r[0]: r[col] for r in rows} == {"labels": "2.500 (shared seeds)", "temi-C5": "3.250"}


def test_evaluate_scores_a_tiny_digits_run_against_its_held_out_images(tmp_path, one_thread):
    """data (digits keeps every 10th image out) -> features -> train -> sample -> evaluate: the
    1-NN AUROC is computed on the held-out images and lands in metrics.json."""
    import json

    from cedm import data, features, sample, train
    from cedm.io import RunDir

    data.run(tmp_path, "digits", limit=40)
    features.run(tmp_path)
    train.run(tmp_path, "uncond", network="tiny", batch_size=8, mimg=16e-6, progress=False)
    sample.run(tmp_path, "uncond", num=12, steps=2, batch_size=12, progress=False)
    m = evaluate.run(tmp_path, "uncond", metric="backbone", sets=1, num=12, device="cpu")
    saved = json.loads((RunDir(tmp_path).eval("uncond") / "metrics.json").read_text())
    assert saved["metric"].startswith("fd_") and np.isfinite(saved["mean"])
    assert np.isfinite(saved["auroc_1nn"]) and 0.0 <= saved["auroc_1nn"] <= 1.0
    assert saved["auroc_heldout"] == 12 and m["auroc_1nn"] == saved["auroc_1nn"]


def test_the_uniform_ablation_is_scored_beside_the_method(tmp_path):
    """Table 4: `evaluate --ablation uniform` scores sample/<cond>@uniform into eval/<cond>@uniform."""
    rd, imgs = digits_run(tmp_path, limit=60)
    with pytest.raises(CedmError, match="--ablation uniform"):
        evaluate.run(tmp_path, "labels", metric="backbone", sets=1, num=20, device="cpu", ablation="uniform")
    fake_samples(rd, "labels", imgs[:20])
    fake_samples(rd, "labels", 255 - imgs[20:40], "uniform")
    m = evaluate.run(tmp_path, "labels", metric="backbone", sets=1, num=20, device="cpu")
    a = evaluate.run(tmp_path, "labels", metric="backbone", sets=1, num=20, device="cpu", ablation="uniform")
    saved = load_json(rd.root / "eval" / "labels@uniform" / "metrics.json")
    assert saved["ablation"] == a["ablation"] == "uniform" and saved["mean"] == a["mean"]
    assert "ablation" not in m and a["mean"] > 10 * m["mean"]          # inverted digits are far off
    with pytest.raises(CedmError, match="unknown --ablation"):
        evaluate.run(tmp_path, "labels", metric="backbone", sets=1, num=20, device="cpu", ablation="gamma1")
