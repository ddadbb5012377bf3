"""cedm.knn: exact cosine top-k, self excluded by index in every chunk, errors (issue 3)."""
from __future__ import annotations

import numpy as np
import pytest

from cedm import cli
from cedm.io import CedmError, RunDir, save_array, write_manifest
from cedm.knn import cosine_knn


def _brute_sims(x):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u.astype(np.float64) @ u.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    return s


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_matches_brute_force_and_never_contains_self(chunk):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 8)).astype(np.float32) * rng.uniform(0.1, 10, size=(150, 1)).astype(np.float32)
    x[100:110] = x[:10]                                     # exact duplicates: still excluded by index
    x[110:115] = 3 * x[20:25]                               # same direction, other norm: cosine 1
    k = 12
    nn = cosine_knn(x, k, chunk=chunk)
    assert nn.shape == (150, k) and nn.dtype == np.int64
    assert not (nn == np.arange(150)[:, None]).any()
    assert all(len(set(row)) == k for row in nn)
    s = _brute_sims(x)
    ours = np.take_along_axis(s, nn, axis=1)
    best = -np.sort(-s, axis=1)[:, :k]
    np.testing.assert_allclose(ours, best, atol=1e-6)       # same similarities, in decreasing order
    exact = np.argsort(-s, axis=1, kind="stable")[:, :k]
    order = -np.sort(-s, axis=1)
    clear = order[:, k - 1] - order[:, k] > 1e-5             # no near-tie at the k-th place
    assert clear.sum() > 120                                 # (duplicates tie with each other)
    assert all(set(nn[i]) == set(exact[i]) for i in np.flatnonzero(clear))
    for i in range(10):                                      # duplicates find each other first
        assert nn[i, 0] == 100 + i and nn[100 + i, 0] == i
    for i in range(5):
        assert nn[110 + i, 0] == 20 + i


def test_bad_inputs():
    x = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(CedmError, match="need at least k\\+1 points"):
        cosine_knn(x, 10)
    with pytest.raises(CedmError, match="at least 1"):
        cosine_knn(x, 0)
    x[4, 1] = np.nan
    with pytest.raises(CedmError, match="NaN/inf in 1 row"):
        cosine_knn(x, 3)
    with pytest.raises(CedmError, match="2-d"):
        cosine_knn(np.zeros(5, np.float32), 2)


def _features_run(root, feats):
    rd = RunDir(root)
    write_manifest(rd.data, "data", {"dataset": "digits", "resolution": 16, "num_classes": 10})
    save_array(rd.features / "features.npy", feats)
    write_manifest(rd.features, "features", {"backbone": "synthetic"})
    return rd


def test_cli_writes_knn_and_checks_k(tmp_path, capsys):
    x = np.random.default_rng(2).normal(size=(40, 5)).astype(np.float32)
    rd = _features_run(tmp_path / "run", x)
    assert cli.main(["knn", "--run-dir", str(rd.root), "--k", "40"]) == 2
    assert "need at least k+1 points" in capsys.readouterr().err
    assert not rd.knn.exists()
    assert cli.main(["knn", "--run-dir", str(rd.root), "--chunk", "9"]) == 0   # digits preset: k = 10
    nn = np.load(rd.knn / "knn.npy")
    assert nn.shape == (40, 10) and nn.dtype == np.int64
    np.testing.assert_array_equal(nn, cosine_knn(x, 10))
    assert cli.main(["knn", "--run-dir", str(rd.root)]) == 0                   # same config: skipped
    assert "skipped" in capsys.readouterr().err
    assert cli.main(["knn", "--run-dir", str(rd.root), "--k", "5"]) == 2        # other config: error
    assert "different config" in capsys.readouterr().err

    bad = x.copy()
    bad[0, 0] = np.inf
    rb = _features_run(tmp_path / "bad", bad)
    assert cli.main(["knn", "--run-dir", str(rb.root), "--k", "3"]) == 2
    assert "NaN/inf" in capsys.readouterr().err and not rb.knn.exists()


def _restated_knn_predict(train, train_lab, test, k, temperature=None):
    """The 20-NN classifier restated in numpy: cosine top-k, votes exp(cos/T) (DINO) or counts."""
    u = train / np.linalg.norm(train, axis=1, keepdims=True)
    v = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = v.astype(np.float64) @ u.T.astype(np.float64)
    classes = np.unique(train_lab)
    preds = []
    for row in sim:
        top = np.argsort(-row, kind="stable")[:k]
        w = np.exp(row[top] / temperature) if temperature else np.ones(k)
        votes = np.array([w[train_lab[top] == c].sum() for c in classes])
        preds.append(classes[np.argmax(votes)])                 # ties: the smallest label
    return np.array(preds)


def temi_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """TEMI's eval_cluster_utils.knn_classifier (HHU-MMBS/TEMI-official-BMVC2023), as its code reads,
    less `.cuda()`: what the authors' gen_embeds.py reports as the k-NN accuracy (percent)."""
    import torch
    from torch import nn

    if isinstance(train_labels, np.ndarray):
        train_labels = torch.from_numpy(train_labels)
        test_labels = torch.from_numpy(test_labels)

    train_features = nn.functional.normalize(train_features, dim=1, p=2)
    test_features = nn.functional.normalize(test_features, dim=1, p=2)

    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = num_test_images // num_chunks
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        temp = torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                         distances_transform.view(batch_size, -1, 1))
        probs = torch.sum(temp, 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
    top1 = top1 * 100.0 / total
    top5 = top5 * 100.0 / total
    return top1, top5


def test_20nn_accuracy_is_temis_knn_classifier_at_t_002():
    """Table 3's accuracy (docs/method.md#knn-accuracy) is what the authors' gen_embeds.py prints:
    TEMI's knn_classifier with k = 20 and its --temperature default 0.02 (top-1 and top-5), DINO's
    T = 0.07 beside it. Ten classes along ten directions (cosine ignores the norm), noisy enough
    that T and top-5 matter."""
    import torch

    from cedm.knn import DINO_KNN_TEMPERATURE, KNN_CLASSIFIER_K, KNN_TEMPERATURE, knn_accuracy

    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(10, 16))

    def make(n):
        y = rng.integers(0, 10, n)
        x = dirs[y] + 1.6 * rng.normal(size=(n, 16))
        return (x * rng.uniform(0.2, 5, (n, 1))).astype(np.float32), y

    train, ytr = make(600)
    test, yte = make(300)
    r = knn_accuracy(train, ytr, test, yte)
    assert (KNN_CLASSIFIER_K, KNN_TEMPERATURE, DINO_KNN_TEMPERATURE) == (20, 0.02, 0.07)
    assert (r["k"], r["temperature"], r["num_train"], r["num_test"]) == (20, 0.02, 600, 300)
    for key, t in (("", 0.02), ("dino", 0.07)):
        top1, top5 = temi_knn_classifier(torch.from_numpy(train), ytr, torch.from_numpy(test), yte, 20, t, 10)
        got = r[key] if key else r
        assert got["accuracy"] == pytest.approx(top1 / 100, abs=1e-12)
        assert got["accuracy_top5"] == pytest.approx(top5 / 100, abs=1e-12)
    assert r["dino"]["temperature"] == 0.07
    assert 0.4 < r["accuracy"] < r["accuracy_top5"] < 1.0              # informative, not trivial
    assert r["accuracy"] != r["dino"]["accuracy"]                     # T matters on this set
    want_major = (_restated_knn_predict(train, ytr, test, 20) == yte).mean()
    assert r["accuracy_majority"] == pytest.approx(want_major, abs=1e-12)
    # labels that are not 0..K-1 give the same numbers
    shifted = knn_accuracy(train, ytr * 10 + 5, test, yte * 10 + 5)
    assert (shifted["accuracy"], shifted["dino"]) == (r["accuracy"], r["dino"])
    # labels unrelated to the features: about chance
    assert knn_accuracy(train, rng.permutation(ytr), test, yte)["accuracy"] < 0.25
    # one neighbour, a query equal to a training point up to its norm: that point's label
    one = knn_accuracy(train, ytr, 7 * train[:50], ytr[:50], k=1)
    assert one["accuracy"] == one["accuracy_majority"] == 1.0


@pytest.mark.parametrize("num_classes", [2, 3])
def test_knn_accuracy_with_fewer_than_five_classes(num_classes):
    """AFHQv2 has 3 classes: TEMI's knn_classifier narrows its top-5 to min(5, k) columns of a
    [M, classes] ranking and fails (RuntimeError); ours counts min(5, k, classes) columns
    (docs/method.md#knn-accuracy). Top-1 is TEMI's: the same as TEMI's with the classes padded to
    5 by empty ones (an empty class has no vote, so it ranks after every voted one)."""
    import torch

    from cedm.knn import knn_accuracy

    rng = np.random.default_rng(num_classes)
    dirs = rng.normal(size=(num_classes, 8))

    def make(n):
        y = rng.integers(0, num_classes, n)
        return (dirs[y] + 1.5 * rng.normal(size=(n, 8))).astype(np.float32), y

    train, ytr = make(300)
    test, yte = make(200)                       # TEMI's chunks: 1/100 of the queries each
    with pytest.raises(RuntimeError, match="exceeds dimension size"):          # the upstream flaw
        temi_knn_classifier(torch.from_numpy(train), ytr, torch.from_numpy(test), yte, 20, 0.02, num_classes)
    r = knn_accuracy(train, ytr, test, yte)
    top1, _ = temi_knn_classifier(torch.from_numpy(train), ytr, torch.from_numpy(test), yte, 20, 0.02, 5)
    assert r["accuracy"] == pytest.approx(top1 / 100, abs=1e-12)
    assert 1 / num_classes < r["accuracy"] < 1.0 and r["accuracy_top5"] == 1.0      # every class is in the top 5
    assert r["dino"]["accuracy_top5"] == 1.0 and 0 < r["accuracy_majority"] < 1.0
    yte_unseen = yte.copy()
    yte_unseen[:20] = 7                                                          # a class never trained on
    assert knn_accuracy(train, ytr, test, yte_unseen)["accuracy_top5"] == pytest.approx(0.9)
    one = knn_accuracy(train, ytr, test, yte, k=1)                               # k = 1 < classes: top-5 is top-1
    assert one["accuracy_top5"] == one["accuracy"] == one["accuracy_majority"]


def test_knn_accuracy_reads_read_only_memory_maps_without_a_warning(tmp_path):
    """The features stage hands it memory maps opened read-only: copied, never wrapped (torch
    warns once per process about a non-writable array, so a fresh interpreter checks it)."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.normal(size=(50, 4)).astype(np.float32))
    np.save(tmp_path / "test.npy", rng.normal(size=(10, 4)).astype(np.float32))
    code = ("import numpy as np; from cedm.knn import knn_accuracy; "
            f"a = np.load({str(tmp_path / 'train.npy')!r}, mmap_mode='r'); "
            f"b = np.load({str(tmp_path / 'test.npy')!r}, mmap_mode='r'); "
            "print(knn_accuracy(a, np.arange(50) % 6, b, np.arange(10) % 6, k=5)['accuracy'])")
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "not writable" not in r.stderr, r.stderr[-2000:]
    assert 0.0 <= float(r.stdout) <= 1.0


def test_the_three_votes_share_one_neighbour_search(monkeypatch):
    """T = 0.02, T = 0.07 and the majority vote are three rules over the same k neighbours: one
    search (one matmul + topk per chunk of queries), not three."""
    from cedm import knn

    calls = []
    real = knn._neighbours
    monkeypatch.setattr(knn, "_neighbours", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    knn.knn_accuracy(x, np.arange(60) % 4, x[:20], np.arange(20) % 4, k=5)
    assert calls == [5]


def test_knn_accuracy_bad_inputs():
    from cedm.knn import knn_accuracy

    x = np.ones((10, 4), np.float32)
    with pytest.raises(CedmError, match="labels"):
        knn_accuracy(x, np.zeros(9), x, np.zeros(10))
    with pytest.raises(CedmError, match="-d"):
        knn_accuracy(x, np.zeros(10), np.ones((3, 5), np.float32), np.zeros(3))
    with pytest.raises(CedmError, match="k=20"):
        knn_accuracy(x, np.zeros(10), x, np.zeros(10))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(CedmError, match="NaN"):
        knn_accuracy(x, np.zeros(10), bad, np.zeros(10), k=3)
