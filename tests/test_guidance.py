"""Confidence-filtered sampling (cedm.sample.generate_filtered; docs/method.md#filtering) and the
guidance sweep (cedm.guidance; docs/method.md#guidance-sweep) on a tiny real digits run."""
import json
import shutil

import numpy as np
import pytest

from cedm import guidance, sample
from cedm.io import CedmError, RunDir, load_json, save_json, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """digits (60 images, 8 px) -> pixels -> kNN -> TEMI C=3 (head kept) and k-means C=3 -> a
    2-step temi-C3 (label dropout, EMA snapshots at 8 and 16 images) and labels model."""
    from cedm import cluster, data, features, knn, train

    root = tmp_path_factory.mktemp("guidance")
    data.run(root, "digits", limit=60)
    features.run(root)
    knn.run(root, k=5)
    cluster.run(root, "temi", 3, heads=2, epochs=2, batch_size=32, progress=False)
    cluster.run(root, "kmeans", 3, progress=False)
    kw = dict(network="tiny", batch_size=8, mimg=16e-6, p_uncond=0.1, snapshot_every_mimg=8e-6, progress=False)
    train.run(root, "temi-C3", **kw)
    train.run(root, "labels", **kw)
    return root


# ----------------------------------------------------------------------------------------------
# Filtering

def test_keep_confident_keeps_the_top_of_each_label_up_to_its_quota():
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 0, 1])
    scores = np.array([.5, .9, .7, .1, .9, .7, .3, .2, .8])
    keep = sample.keep_confident(labels, scores, np.array([2, 1, 1]))
    # label 0: .7 (index 2) and .7 (index 5) beat .5, .2; label 1: the tie .9/.9 goes to index 1; label 2: .3
    np.testing.assert_array_equal(keep, [1, 2, 5, 6])
    np.testing.assert_array_equal(np.bincount(labels[keep], minlength=3), [2, 1, 1])
    assert len(sample.keep_confident(labels, scores, np.array([0, 0, 0]))) == 0
    with pytest.raises(CedmError, match="fewer candidates"):
        sample.keep_confident(labels, scores, np.array([5, 0, 0]))


def _fake_scorer(C):
    """probabilities over C clusters from the images (a deterministic stand-in for the TEMI head)."""
    def score(images):
        m = images.reshape(len(images), -1).astype(np.float64)
        logits = np.stack([np.cos(m.mean(1) / (7.0 + c)) * 5 for c in range(C)], 1)
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)
    return score


def test_filtered_sampling_keeps_the_label_counts_of_the_plain_draw_and_is_seeded(run):
    """The kept set has exactly the plain draw's label counts (itself a draw from q(c)), holds the
    best-scoring candidates of each label, comes from the plain seeds and the extra seeds
    EXTRA_SEEDS + seed_base (K - 1) .., and is the same set for the same seeds; K = 1 is the plain draw."""
    net, meta = sample.load_network(run / "train/temi-C3")
    meta = dict(meta, q=[0.7, 0.2, 0.1])
    score = _fake_scorer(3)
    kw = dict(steps=1, progress=False, batch_size=64)
    num, K, base = 40, 3, 5
    plain = sample.generate(net, meta, num, seed_base=base, **kw)
    got = sample.generate_filtered(net, meta, num, score, K, "msp", seed_base=base, **kw)
    np.testing.assert_array_equal(np.bincount(got["labels"], minlength=3), np.bincount(plain["labels"], minlength=3))
    first, count = sample.extra_seeds(base, num, K)
    assert (first, count) == (10**9 + base * 2, 80)
    cand_seeds = np.concatenate([np.arange(base, base + num), np.arange(first, first + count)])
    assert set(got["seeds"]) <= set(cand_seeds) and len(set(got["seeds"])) == num
    assert np.all(np.diff(got["seeds"]) > 0)                                   # seed order
    extra = sample.generate(net, meta, count, seed_base=first, **kw)
    cand = {k: np.concatenate([plain[k], extra[k]]) for k in plain}
    msp = score(cand["images"]).max(1)
    for c in range(3):                       # every kept image of c scores >= every dropped one of c
        kept = np.isin(cand["seeds"], got["seeds"]) & (cand["labels"] == c)
        dropped = ~np.isin(cand["seeds"], got["seeds"]) & (cand["labels"] == c)
        if kept.any() and dropped.any():
            assert msp[kept].min() >= msp[dropped].max()
    np.testing.assert_allclose(got["scores"], msp[np.isin(cand["seeds"], got["seeds"])])
    np.testing.assert_allclose(got["plain_scores"], msp[:num])
    assert got["scores"].mean() >= got["plain_scores"].mean()
    again = sample.generate_filtered(net, meta, num, score, K, "msp", seed_base=base, batch_size=7,
                                     steps=1, progress=False)
    for k in ("images", "labels", "clusters", "seeds", "scores"):
        np.testing.assert_array_equal(got[k], again[k])                      # same seeds, same kept set
    one = sample.generate_filtered(net, meta, num, score, 1, "msp", seed_base=base, **kw)
    for k in plain:
        np.testing.assert_array_equal(one[k], plain[k])
    own = sample.generate_filtered(net, meta, num, score, K, "cluster", seed_base=base, **kw)
    assert (own["scores"] == score(own["images"])[np.arange(num), own["clusters"]]).all()
    for bad in (0, -1, 1.5):
        with pytest.raises(CedmError, match="--oversample K must be a whole number >= 1"):
            sample.generate_filtered(net, meta, num, score, bad, "msp", **kw)
    with pytest.raises(CedmError, match="--filter must be one of msp, cluster"):
        sample.generate_filtered(net, meta, num, score, 2, "entropy", **kw)


def test_filtered_label_counts_follow_q(run):
    """Over many images the kept labels follow q(c) as a plain draw does (the filter never moves an
    image from one label to another)."""
    net, meta = sample.load_network(run / "train/temi-C3")
    meta = dict(meta, q=[0.6, 0.3, 0.1])
    got = sample.generate_filtered(net, meta, 600, _fake_scorer(3), 2, "msp", steps=1, progress=False,
                                   batch_size=600)
    freq = np.bincount(got["labels"], minlength=3) / 600
    assert np.abs(freq - meta["q"]).max() < 0.06, freq


def test_the_sample_stage_filters_with_the_models_own_temi_head(run, tmp_path):
    from cedm.cli import main
    from cedm.io import MANIFEST

    for d in ("data", "features", "knn", "cluster", "train"):
        shutil.copytree(run / d, tmp_path / d)
    args = ["sample", "--run-dir", str(tmp_path), "--cond", "temi-C3", "--num", "8", "--steps", "2"]
    assert main(args + ["--oversample", "3", "--filter", "msp"]) == 0
    out = tmp_path / "sample/temi-C3@mspx3"                              # beside the plain set
    man = load_json(out / MANIFEST)
    assert (man["config"]["oversample"], man["config"]["filter"]) == (3, "msp")
    assert {"features", "cluster/temi-C3"} <= set(man["inputs"])
    z = np.load(out / "images.npz")
    s = load_json(out / "summary.json")
    assert s["filter"]["oversample"] == 3 and s["filter"]["score_kept_mean"] >= s["filter"]["score_plain_mean"]
    # the scores are the real TEMI head's maximum softmax probability on the backbone features
    probs = sample.confidence_scorer(tmp_path, sample.load_network(tmp_path / "train/temi-C3")[1])(z["images"])
    np.testing.assert_allclose(z["scores"], probs.max(1), rtol=1e-6)
    assert probs.shape == (8, 3) and np.allclose(probs.sum(1), 1)
    plain = sample.generate(*sample.load_network(tmp_path / "train/temi-C3"), 8, steps=2, progress=False)
    np.testing.assert_array_equal(np.bincount(z["labels"], minlength=3), np.bincount(plain["labels"], minlength=3))
    # models without a TEMI head say so, in one line
    assert main(["sample", "--run-dir", str(tmp_path), "--cond", "labels", "--num", "4", "--steps", "2",
                 "--oversample", "2", "--filter", "msp"]) == 2
    _, lmeta = sample.load_network(tmp_path / "train/labels")
    with pytest.raises(CedmError, match="labels is conditioned on labels: it has no cluster head"):
        sample.confidence_scorer(tmp_path, lmeta)
    with pytest.raises(CedmError, match="uncond is unconditional"):
        sample.confidence_scorer(tmp_path, dict(lmeta, tag="uncond", kind="uncond"))
    _, meta = sample.load_network(tmp_path / "train/temi-C3")
    with pytest.raises(CedmError, match="k-means clustering.*no confidence"):
        sample.confidence_scorer(tmp_path, dict(meta, tag="kmeans-C3", method="kmeans"))
    (tmp_path / "cluster/temi-C3/head.safetensors").unlink()       # as an imported clustering
    with pytest.raises(CedmError, match=r"head.safetensors, which does not exist \(an imported clustering"):
        sample.confidence_scorer(tmp_path, meta)


# ----------------------------------------------------------------------------------------------
# The guidance sweep

def _fd_sets(run_dir, images, sets, num):
    from cedm import evaluate

    key, _, ext, _ = evaluate.choose_extractor(run_dir, "backbone", "cpu")
    ref = evaluate.reference_statistics(run_dir, key, ext)
    f = ext(images)
    return [evaluate.frechet_distance(evaluate.feature_statistics(f[j * num:(j + 1) * num]), ref) for j in range(sets)]


def test_the_guidance_sweep_scores_every_setting_on_paired_sets_and_resumes(run, tmp_path, monkeypatch):
    for d in ("data", "features", "knn", "cluster", "train"):
        shutil.copytree(run / d, tmp_path / d)
    kw = dict(weights="1", intervals=["0.5,50"], sets=2, num=6, steps=2, metric="backbone", oversample=2)
    calls = []
    real = sample.generate

    def counted(*a, **k):
        calls.append((a[2], k))
        if killed and len(calls) > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sample, "generate", counted)
    killed = True                                             # killed during the fourth setting
    with pytest.raises(KeyboardInterrupt):
        guidance.run(tmp_path, "temi-C3", **kw)
    killed = False
    assert len(list((tmp_path / "guidance/temi-C3/settings").glob("*.json"))) == 3
    calls.clear()
    r = guidance.run(tmp_path, "temi-C3", **kw)               # resumes: the first three are not redone
    names = [s["name"] for s in r["settings"]]
    grid = ["unguided", "cfg w=1", "cfg w=1 (0.5,50]", "auto[snapshot:8e-06] w=1", "auto[snapshot:8e-06] w=1 (0.5,50]"]
    assert names[:5] == grid and names[5] == "unguided +msp x2"
    assert len(names) in (6, 7) and (len(names) == 6) == (min(s["mean"] for s in r["settings"][1:5])
                                                          >= r["settings"][0]["mean"])
    # the three settings made before the kill (no guide, all 12 images at once) are not made again
    assert calls and all(k["guide"] is not None for n, k in calls if n == 12)
    # every setting: sets x num images of seeds 0..11, scored as `cedm evaluate` scores them
    net, meta = sample.load_network(tmp_path / "train/temi-C3")
    gnet, _ = sample.load_guide("snapshot:8e-6", tmp_path / "train/temi-C3", meta)
    for s in r["settings"][:5]:
        imgs = real(net, meta, 12, steps=2, progress=False, guidance=s["guidance"], guidance_interval=s["interval"],
                    guide=gnet if s["guide"] else None)["images"]
        np.testing.assert_allclose(s["values"], _fd_sets(tmp_path, imgs, 2, 6), rtol=1e-9)
        assert s["mean"] == pytest.approx(np.mean(s["values"])) and s["std"] == pytest.approx(np.std(s["values"], ddof=1))
        d = np.asarray(s["values"]) - np.asarray(r["settings"][0]["values"])
        assert s["vs_unguided"]["mean"] == pytest.approx(d.mean())
    filtered = [s for s in r["settings"] if s["filter"]]
    assert filtered and all(s["score_kept_mean"] >= s["score_plain_mean"] for s in filtered)
    best = min(r["settings"], key=lambda s: s["mean"])
    assert r["best"]["name"] == best["name"] and r["unguided"]["mean"] == r["settings"][0]["mean"]
    assert r["noise"] == r["settings"][0]["std"] and r["verdict"].startswith(f"best {best['name']}")
    assert load_json(tmp_path / "guidance/temi-C3/sweep.json")["best"] == r["best"]
    assert guidance.run(tmp_path, "temi-C3", **kw) == r                                 # skipped
    from cedm.cli import main

    cli = ["guidance", "--run-dir", str(tmp_path), "--cond", "temi-C3", "--guidance-weights", "1", "--guidance-interval", "0.5,50",
           "--sets", "2", "--num", "6", "--steps", "2", "--metric", "backbone", "--oversample", "2"]
    assert main(cli) == 0                                                                  # the same stage: skipped
    assert main(cli[:-2] + ["--oversample", "0"]) == 2 and main(cli + ["--methods", "cfg,xyz"]) == 2
    with pytest.raises(CedmError, match="differs in: weights"):
        guidance.run(tmp_path, "temi-C3", **dict(kw, weights="1,2"))


def test_the_guidance_sweep_refuses_what_it_cannot_do(run):
    kw = dict(sets=2, num=4, steps=1, metric="backbone")
    with pytest.raises(CedmError, match="--sets >= 2"):
        guidance.run(run, "temi-C3", **dict(kw, sets=1))
    with pytest.raises(CedmError, match="unknown --methods cfgg"):
        guidance.run(run, "temi-C3", methods=["cfgg"], **kw)
    with pytest.raises(CedmError, match="--guidance-weights must be > 0"):
        guidance.run(run, "temi-C3", weights="0,1", **kw)
    with pytest.raises(CedmError, match="--oversample K must be a whole number >= 1"):
        guidance.run(run, "temi-C3", oversample=0, **kw)
    with pytest.raises(CedmError, match=r"not inside \(0, sigma_max"):
        guidance.run(run, "temi-C3", intervals=["1,100"], **kw)
    net, meta = sample.load_network(run / "train/temi-C3")
    with pytest.raises(CedmError, match=r"without label dropout.*--p-uncond 0.1"):
        guidance._check(dict(meta, p_uncond=0.0), ["cfg"], [1.0], [], 1, None)
    with pytest.raises(CedmError, match="nothing to sweep"):
        guidance._check(dict(meta, p_uncond=0.0), [], [1.0], [], 1, None)
    assert guidance.default_guide(run / "train/temi-C3", meta) == "snapshot:8e-06"


def _fake_sweep(root, cond, unguided, best):
    d = guidance.guidance_dir(root, cond)
    d.mkdir(parents=True)
    mk = lambda name, m: {"name": name, "method": "cfg", "guidance": 1.0, "interval": None, "guide": None,
                          "oversample": 1, "filter": None, "mean": m, "std": 0.1, "values": [m - .1, m + .1]}
    settings = [dict(mk("unguided", unguided), guidance=0.0, method="none"), mk("cfg w=1", unguided + 1),
                mk("cfg w=0.5", best)]
    for s in settings:
        s["vs_unguided"] = {"mean": s["mean"] - unguided, "std": 0.0}
    save_json(d / "sweep.json", {"cond": cond, "label": "FD", "metric": "fd", "sets": 2, "num": 4,
                                 "settings": settings, **guidance.summarise(settings)})
    write_manifest(d, "guidance", {"cond": cond})


def test_c_v_at_the_best_setting_and_unguided(tmp_path):
    """C_V by plan.verdict's rule (the lowest FD among the C's that beat the unconditional model,
    plan.versus), once on the unguided FDs (the paper's protocol) and once at each model's best
    setting; a C above C_max is never picked."""
    _fake_sweep(tmp_path, "temi-C10", unguided=5.0, best=4.5)
    _fake_sweep(tmp_path, "temi-C20", unguided=5.5, best=3.0)
    _fake_sweep(tmp_path, "temi-C40", unguided=1.0, best=1.0)
    _fake_sweep(tmp_path, "labels", unguided=1.0, best=0.5)
    save_json(RunDir(tmp_path).bound / "table.json", {"c_max": 30})
    v = guidance.c_v_choice(tmp_path)
    assert (v["c_v_unguided"], v["c_v_guided"], v["case_unguided"]) == (10, 20, "no baseline")
    _fake_sweep(tmp_path, "uncond", unguided=6.0, best=3.1)        # autoguided, uncond nearly matches C20
    v = guidance.c_v_choice(tmp_path)
    assert (v["c_v_unguided"], v["case_unguided"]) == (10, "beats")
    assert (v["c_v_guided"], v["case_guided"]) == (None, "none beats")   # 3.0 against 3.1: within the noise
    assert v["fd_unguided"] == 5.0 and v["fd_guided"] is None
    assert "without guidance" in v["protocol"] and set(v["best"]) == {"temi-C10", "temi-C20", "temi-C40", "labels",
                                                                       "uncond"}
    lines = guidance.report_lines(tmp_path)
    assert lines[-1] == "C_V = 10 unguided (the paper's protocol); no C_V (none beats) at each model's best setting"
    assert "labels: best cfg w=0.5: 0.500 ± 0.100 against unguided 1.000" in "\n".join(lines) and len(lines) == 6
    assert guidance.c_v_choice(tmp_path, method="kmeans") == {}


def test_the_report_plots_fd_against_the_guidance_weight(tmp_path):
    from cedm import report

    assert report.plot_guidance({"run_dir": str(tmp_path)}) is None
    _fake_sweep(tmp_path, "temi-C10", unguided=5.0, best=4.5)
    _fake_sweep(tmp_path, "labels", unguided=1.0, best=0.5)
    png = report.plot_guidance({"run_dir": str(tmp_path)})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    import io

    assert Image.open(io.BytesIO(png)).width > 400


def test_sweep_verdict_says_whether_the_best_beats_the_noise():
    base = {"name": "unguided", "method": "none", "guidance": 0.0, "interval": None, "guide": None,
            "oversample": 1, "filter": None, "values": [5.0, 5.2, 4.9], "mean": 5.033, "std": 0.15}
    good = dict(base, name="cfg w=1", method="cfg", guidance=1.0, values=[4.0, 4.1, 3.9], mean=4.0, std=0.1)
    noisy = dict(base, name="cfg w=2", method="cfg", guidance=2.0, values=[4.0, 5.5, 5.3], mean=4.933, std=0.8)
    for s in (base, good, noisy):
        s["vs_unguided"] = guidance._paired(s["values"], base["values"])
    assert guidance.summarise([base, good])["best"]["beyond_noise"] is True
    v = guidance.summarise([base, noisy])
    assert v["best"]["name"] == "cfg w=2" and v["best"]["beyond_noise"] is False and "within the noise" in v["verdict"]
    assert guidance.summarise([base])["best"]["name"] == "unguided"
    json.dumps(guidance.summarise([base, good]))
