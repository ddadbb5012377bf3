"""cedm.cluster: TEMI / k-means (Euclidean, spherical) stage, utilisation r_C, metrics, errors (issue 3)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cedm import cli, cluster, heads, knn, telemetry
from cedm.io import RunDir, save_array, write_manifest

K = 5
SIZES = (90, 75, 60, 50, 40)            # unequal group sizes, N = 315
# Small, fast TEMI settings (same algorithm as docs/method.md#temi; narrower heads, higher lr, fewer steps).
TEMI = dict(heads=4, epochs=100, batch_size=64, lr=1e-3, teacher_momentum=0.99, hidden=64, bottleneck=32)


def blobs(sizes=SIZES, dim=16, noise=0.01, seed=0):
    """K well-separated groups on the unit sphere (orthogonal centres, small noise)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:len(sizes)]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def make_run(root, features, labels=None, coarse=None, k=10):
    """A run directory with data/ (manifest + labels), features/ and knn/ as the stages write them."""
    rd = RunDir(root)
    if labels is not None:
        save_array(rd.data / "labels.npy", np.asarray(labels, np.int64))
    if coarse is not None:
        save_array(rd.data / "coarse_labels.npy", np.asarray(coarse, np.int64))
    write_manifest(rd.data, "data", {"dataset": "blobs", "resolution": 8,
                                     "num_classes": None if labels is None else int(np.max(labels)) + 1})
    save_array(rd.features / "features.npy", features)
    write_manifest(rd.features, "features", {"backbone": "synthetic"})
    if k:
        knn.run(rd.root, k=k)
    return rd


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory):
    x, lab = blobs()
    return make_run(tmp_path_factory.mktemp("blobs") / "run", x, lab, coarse=lab // 2), x, lab


@pytest.fixture(scope="module")
def temi_k(blob_run):
    rd, _, _ = blob_run
    return cluster.run(rd.root, "temi", K, progress=False, **TEMI)


def test_temi_recovers_groups_at_C_equal_K(blob_run, temi_k):
    rd, x, lab = blob_run
    s = temi_k
    assert s["anmi"] > 0.9 and s["acc"] > 0.9 and s["nmi"] > 0.9
    assert s["used_clusters"] == K and s["r_c"] == 1.0
    for key in ("method", "clusters", "used_clusters", "r_c", "q", "loss", "best_head", "heads", "epochs",
                "seed", "anmi", "nmi", "acc", "acc_hungarian", "ari", "anmi_coarse", "nmi_coarse", "acc_coarse",
                "acc_hungarian_coarse", "ari_coarse"):
        assert key in s, key
    assert s["method"] == "temi" and s["clusters"] == K and s["heads"] == TEMI["heads"]
    assert 0 <= s["best_head"] < TEMI["heads"] and np.isfinite(s["loss"])
    out = rd.cluster("temi", K)
    a = np.load(out / "assignments.npy")
    assert a.dtype == np.int64 and a.shape == (len(x),) and a.min() >= 0 and a.max() < K
    assert np.allclose(s["q"], np.bincount(a, minlength=K) / len(a)) and abs(sum(s["q"]) - 1) < 1e-9
    assert json.loads((out / "summary.json").read_text())["used_clusters"] == K
    # the saved head (the kept teacher) reproduces c*(x) = argmax q_t(c|x)
    head = heads.load_head(out / "head.safetensors")
    p = head.predict(x)
    assert p.shape == (len(x), K) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert np.array_equal(p.argmax(1), a)
    # telemetry gauges
    lbl = {"method": "temi", "clusters": str(K)}
    assert telemetry.REGISTRY.get_sample_value("cedm_cluster_utilisation_ratio", lbl) == 1.0
    assert telemetry.REGISTRY.get_sample_value("cedm_cluster_used_clusters", lbl) == K


def test_temi_utilisation_falls_far_above_K(blob_run):
    rd, _, _ = blob_run
    s = cluster.run(rd.root, "temi", 8 * K, progress=False, **TEMI)
    assert s["r_c"] < 0.96, s["r_c"]
    assert s["used_clusters"] == len(np.unique(np.load(rd.cluster("temi", 8 * K) / "assignments.npy")))


def test_temi_training_settings_are_recorded_and_checked(blob_run, temi_k, tmp_path):
    """The official training by default, in the config and summary; bad values are clear errors."""
    rd, x, lab = blob_run
    cfg = json.loads((rd.cluster("temi", K) / "manifest.json").read_text())["config"]
    assert {k: cfg[k] for k in cluster.TEMI_TRAINING} == {
        "norm_last_layer": False, "lr_schedule": "cosine", "warmup_epochs": 10, "min_lr": 1e-6,
        "freeze_last_layer": 1} == {k: temi_k[k] for k in cluster.TEMI_TRAINING}
    rb = make_run(tmp_path / "bad", x, lab)
    for bad, needle in ((dict(warmup_epochs=-1), "at least 0"), (dict(lr_schedule="step"), "--lr-schedule")):
        with pytest.raises(cluster.CedmError, match=needle):
            cluster.run(rb.root, "temi", K, progress=False, **{**TEMI, **bad})
    assert not (rb.root / "cluster").exists() or not any((rb.root / "cluster").iterdir())


def test_temi_is_deterministic_per_seed(blob_run, temi_k, tmp_path):
    rd, x, lab = blob_run
    rd2 = make_run(tmp_path / "again", x, lab, coarse=lab // 2)
    s2 = cluster.run(rd2.root, "temi", K, progress=False, **TEMI)
    a1 = np.load(rd.cluster("temi", K) / "assignments.npy")
    a2 = np.load(rd2.cluster("temi", K) / "assignments.npy")
    assert np.array_equal(a1, a2) and s2["loss"] == temi_k["loss"] and s2["best_head"] == temi_k["best_head"]


def test_same_config_is_reused_other_config_is_an_error(blob_run, temi_k, capsys):
    rd, _, _ = blob_run
    s = cluster.run(rd.root, "temi", K, progress=False, **TEMI)
    assert s["reused"] and s["anmi"] == temi_k["anmi"]
    args = ["cluster", "--run-dir", str(rd.root), "--method", "temi", "--clusters", str(K),
            "--heads", "4", "--epochs", "3", "--batch-size", "64", "--hidden", "64", "--bottleneck", "32"]
    assert cli.main(args) == 2
    assert "different config" in capsys.readouterr().err
    assert np.load(rd.cluster("temi", K) / "assignments.npy").shape == (sum(SIZES),)  # untouched


@pytest.mark.parametrize("method", ["kmeans", "skmeans"])
def test_kmeans_uses_every_cluster(blob_run, method):
    rd, x, lab = blob_run
    for c in (K, 8 * K):
        s = cluster.run(rd.root, method, c, progress=False)
        assert s["r_c"] == 1.0 and s["used_clusters"] == c
    s = json.loads((rd.cluster(method, K) / "summary.json").read_text())
    assert s["anmi"] > 0.9 and s["method"] == method
    a = np.load(rd.cluster(method, K) / "assignments.npy")
    head = heads.load_head(rd.cluster(method, K) / "head.safetensors")
    assert head.metric == ("euclidean" if method == "kmeans" else "cosine")
    assert np.array_equal(head.predict(x).argmax(1), a)
    from cedm.conditioning import parse_tag
    assert tuple(parse_tag(f"{method}-C{K}")) == ("clusters", method, K)      # tag grammar takes it


def test_kmeans_method_is_sklearn_kmeans_on_raw_features(tmp_path):
    """`kmeans` = scikit-learn KMeans (Euclidean, n_init=10) on the raw features: two groups on one
    ray at radii 1 and 5 are split by it, never by the cosine (skmeans) one, which sees one point."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    d = rng.normal(size=(30, 8)) * 0.02 + np.eye(8)[0]
    x = np.concatenate([d, 5 * d]).astype(np.float32)
    lab = np.repeat([0, 1], 30)
    rd = make_run(tmp_path / "ray", x, lab, k=0)
    s = cluster.run(rd.root, "kmeans", 2, seed=4, progress=False)
    a = np.load(rd.cluster("kmeans", 2) / "assignments.npy")
    ref = KMeans(2, n_init=10, random_state=4).fit(x)
    assert np.array_equal(a, ref.labels_) and s["acc"] == 1.0
    assert s["loss"] == pytest.approx(ref.inertia_ / len(x), rel=1e-5)
    assert json.loads((rd.cluster("kmeans", 2) / "manifest.json").read_text())["config"]["n_init"] == 10
    assert cluster.run(rd.root, "skmeans", 2, seed=4, progress=False)["acc"] < 0.8
    y, _ = blobs(seed=3)
    one = cluster.euclidean_kmeans(y, 7, seed=1)["assignments"]
    assert np.array_equal(one, cluster.euclidean_kmeans(y, 7, seed=1)["assignments"])    # seeded


def test_kmeans_is_seeded():
    x, _ = blobs(seed=3)
    a = cluster.kmeans(x, 7, seed=1)["assignments"]
    assert np.array_equal(a, cluster.kmeans(x, 7, seed=1)["assignments"])
    assert not np.array_equal(a, cluster.kmeans(x, 7, seed=2)["assignments"])


def test_kmeans_reports_empty_clusters_honestly():
    # 3 distinct points (10 copies each) cannot fill 5 clusters: C^u = 3, r_C = 0.6
    x = np.repeat(np.eye(3, 4, dtype=np.float32), 10, axis=0)
    res = cluster.kmeans(x, 5, seed=0)
    u = cluster.utilisation(res["assignments"], 5)
    assert u["used_clusters"] == 3 and u["r_c"] == pytest.approx(0.6)
    # with enough distinct points every cluster is used (empty ones are re-seeded)
    y, _ = blobs(sizes=(30, 30), dim=8, noise=0.2, seed=1)
    assert cluster.utilisation(cluster.kmeans(y, 12, seed=0)["assignments"], 12)["r_c"] == 1.0


def test_metrics():
    lab = np.array([0, 0, 1, 1, 2, 2, 2])
    perm = np.array([2, 2, 0, 0, 1, 1, 1])           # same partition, other ids
    m = cluster.cluster_metrics(lab, perm)
    assert m == pytest.approx({"anmi": 1.0, "nmi": 1.0, "ari": 1.0, "acc": 1.0, "acc_hungarian": 1.0})
    # one-to-one matching: 4 clusters for 3 classes -> one cluster cannot be matched; TEMI's ACC
    # gives the unmatched (pure) cluster 3 its majority class, 2
    four = np.array([0, 0, 1, 1, 2, 2, 3])
    assert cluster.hungarian_acc(lab, four) == pytest.approx(6 / 7)
    assert cluster.temi_acc(lab, four) == pytest.approx(1.0)
    assert cluster.cluster_metrics(lab, np.zeros(7, int))["anmi"] == pytest.approx(0.0, abs=1e-9)


def test_acc_of_100_pure_clusters_on_10_classes_is_one():
    """TEMI's ACC (docs/method.md#cluster-metrics): pure over-clustering is not an error; the strict
    one-to-one accuracy of the same clusters is about 10 / 100."""
    rng = np.random.default_rng(0)
    clusters = rng.permutation(np.repeat(np.arange(100), 7))           # 100 clusters of 7
    labels = (clusters * 37 % 100) % 10                                   # each cluster one class
    m = cluster.cluster_metrics(labels, clusters)
    assert m["acc"] == pytest.approx(1.0)
    assert m["acc_hungarian"] == pytest.approx(0.1)
    # impure leftovers count their majority only: cluster 100 holds 3 of class 0 and 1 of class 1
    lab2 = np.concatenate([labels, [0, 0, 0, 1]])
    cl2 = np.concatenate([clusters, [100] * 4])
    assert cluster.temi_acc(lab2, cl2) == pytest.approx((700 + 3) / 704)
    # C <= classes: TEMI's ACC is the one-to-one accuracy
    few = labels % 5
    assert cluster.temi_acc(labels, few) == pytest.approx(cluster.hungarian_acc(labels, few))
    # ARI is scikit-learn's: 1 for the same partition, ~0 for an independent one
    assert m["ari"] < 0.2 and cluster.cluster_metrics(labels, labels + 3)["ari"] == pytest.approx(1.0)


def test_label_metrics_renames_a_summary_of_the_one_to_one_acc():
    from cedm.cluster_metrics import label_metrics

    old = {"anmi": 0.5, "nmi": 0.6, "acc": 0.3}                          # written before TEMI's ACC
    assert label_metrics(old) == {"acc": None, "acc_hungarian": 0.3, "ari": None, "nmi": 0.6, "anmi": 0.5}
    new = {"anmi": 0.5, "nmi": 0.6, "acc": 0.9, "acc_hungarian": 0.3, "ari": 0.4, "acc_coarse": 0.7,
           "acc_hungarian_coarse": 0.2}
    assert label_metrics(new)["acc"] == 0.9 and label_metrics(new, "_coarse")["acc"] == 0.7
    assert label_metrics({"r_c": 1.0}) == {}


def _cli_error(capsys, argv, needle):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path, capsys):
    x, lab = blobs(sizes=(20, 20), dim=8)
    rd = make_run(tmp_path / "ok", x, lab, k=5)
    base = ["cluster", "--run-dir", str(rd.root), "--epochs", "1", "--heads", "1"]
    _cli_error(capsys, base + ["--method", "temi", "--clusters", "1"], "at least 2")
    _cli_error(capsys, base + ["--method", "kmeans", "--clusters", "41"], "exceeds the number of samples")
    assert not (rd.root / "cluster").exists() or not any((rd.root / "cluster").iterdir())

    bad = x.copy()
    bad[3, 2] = np.nan
    bad[7, 0] = np.inf
    rn = make_run(tmp_path / "nan", bad, lab, k=0)
    _cli_error(capsys, ["cluster", "--run-dir", str(rn.root), "--method", "kmeans", "--clusters", "2"],
               "NaN/inf in 2 row(s)")
    assert not (rn.root / "cluster").exists()

    rm = make_run(tmp_path / "mismatch", x, lab[:-1])
    _cli_error(capsys, ["cluster", "--run-dir", str(rm.root), "--method", "kmeans", "--clusters", "2"],
               "feature and label counts differ")
    assert not (rm.root / "cluster").exists()

    with pytest.raises(SystemExit):                   # argparse: unknown method
        cli.main(["cluster", "--run-dir", str(rd.root), "--method", "dbscan", "--clusters", "2"])


def test_temi_flags_derive_from_the_typed_config():
    """One TEMI flag per TEMIConfig field; the help prints the paper's default and the digits one."""
    from dataclasses import fields

    from cedm.config import PRESETS, TEMI

    sub = [a for a in cli.build_parser()._actions if a.dest == "command"][0]
    acts = {a.dest: a for a in sub.choices["cluster"]._actions}
    for f in fields(TEMI):
        v = getattr(TEMI, f.name)
        shown = str(v) if isinstance(v, (bool, str)) else f"{v:g}"
        assert acts[f.name].default is None and f"preset, {shown}" in acts[f.name].help
    # the official training by default (Table 8 read as the official code); today's by flags
    assert (TEMI.norm_last_layer, TEMI.lr_schedule, TEMI.warmup_epochs, TEMI.freeze_last_layer) == (
        False, "cosine", 10, 1)
    args = cli.build_parser().parse_args(["cluster", "--method", "temi", "--clusters", "3", "--norm-last-layer",
                                          "--lr-schedule", "constant", "--freeze-last-layer", "0"])
    kw = cluster.temi_kwargs(args)
    assert (kw["norm_last_layer"], kw["lr_schedule"], kw["freeze_last_layer"], kw["min_lr"]) == (
        True, "constant", 0, None)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["cluster", "--method", "temi", "--clusters", "3", "--lr-schedule", "step"])
    assert "digits 0.001" in acts["lr"].help and "digits" not in acts["gamma"].help
    assert TEMI.gamma == 0.6 and PRESETS["digits"].temi.heads == 8 and PRESETS["cifar10"].temi == TEMI


def test_gamma1_ablation_sits_beside_the_method_and_collapses(blob_run, temi_k, capsys):
    """The paper's Table 5: TEMI with gamma = 1 at a C far above K uses fewer clusters than gamma 0.6,
    in cluster/temi-C<C>@gamma1, leaving temi-C<C> (and the C_max search, which ignores it) alone."""
    rd, _, _ = blob_run
    base = cluster.run(rd.root, "temi", 8 * K, progress=False, **TEMI)
    abl = cluster.run(rd.root, "temi", 8 * K, progress=False, ablation="gamma1", **TEMI)
    assert (rd.root / "cluster" / f"temi-C{8 * K}@gamma1" / "manifest.json").exists()
    assert abl["gamma"] == 1.0 and abl["ablation"] == "gamma1"
    assert abl["used_clusters"] < base["used_clusters"], (abl["used_clusters"], base["used_clusters"])
    assert json.loads((rd.cluster("temi", 8 * K) / "summary.json").read_text())["used_clusters"] == base["used_clusters"]
    from cedm.bound import finished

    assert set(finished(rd)) >= {K, 8 * K} and all(isinstance(c, int) for c in finished(rd))
    for argv, needle in ((["--method", "kmeans", "--clusters", "5", "--ablation", "gamma1"], "TEMI ablation"),
                         (["--method", "temi", "--clusters", "5", "--ablation", "gamma1", "--gamma", "0.5"],
                          "drop --gamma")):
        assert cli.main(["cluster", "--run-dir", str(rd.root), *argv]) == 2, argv
        assert needle in capsys.readouterr().err
    with pytest.raises(cluster.CedmError, match="unknown --ablation 'uniform'"):
        cluster.run(rd.root, "temi", 5, progress=False, ablation="uniform", **TEMI)
