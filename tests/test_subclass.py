"""cedm.subclass (ClusDiff): sub-classes inside labelled classes, sampling by class, balancing."""
import numpy as np
import pytest

from cedm import subclass
from cedm.io import CedmError


def grouped(seed=0, classes=3, subs=(2, 3, 1), per=40, dim=16):
    """Class y has subs[y] well-separated sub-groups (unit directions on a sphere)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][: sum(subs)] * 4
    x, y, g = [], [], []
    k = 0
    for c in range(classes):
        for _ in range(subs[c]):
            x.append(centres[k] + 0.3 * rng.normal(size=(per, dim)))
            y += [c] * per
            g += [k] * per
            k += 1
    return np.concatenate(x).astype(np.float32), np.array(y), np.array(g)


@pytest.mark.parametrize("method", ["ap", "kmeans"])
def test_subclasses_recover_the_known_subgroups(method):
    from sklearn.metrics import adjusted_rand_score

    x, y, g = grouped()
    res = subclass.within_labels(x, y, method=method, max_sub=3, progress=False)
    if method == "ap":   # AP picks the number of sub-classes itself
        assert adjusted_rand_score(g, res["assignments"]) > 0.95
        assert [p["subclasses"] for p in res["per_class"]] == [2, 3, 1]
    else:                # k-means uses the per-class C (here 3)
        from sklearn.metrics import homogeneity_score

        assert homogeneity_score(g, res["assignments"]) > 0.95   # no sub-class mixes groups
        assert [p["subclasses"] for p in res["per_class"]] == [3, 3, 3]
    # sub-classes never straddle classes, and frequencies add up to one within each class
    cls = np.asarray(res["subclass_class"])
    assert (cls[res["assignments"]] == y).all()
    for c in range(3):
        assert abs(sum(f for f, k in zip(res["within_freq"], cls) if k == c) - 1) < 1e-9


def test_cap_and_small_classes():
    x, y, _ = grouped(subs=(3, 3, 3))
    res = subclass.within_labels(x, y, method="ap", max_sub=2, progress=False)
    assert max(p["subclasses"] for p in res["per_class"]) <= 2
    tiny = np.concatenate([y, [7, 7, 7]])
    xt = np.concatenate([x, x[:3]])
    res = subclass.within_labels(xt, tiny, method="kmeans", max_sub=10, progress=False)
    assert {p["class"]: p["subclasses"] for p in res["per_class"]}[7] == 1   # too small to split


def test_class_subclasses_and_errors():
    meta = {"raw_labels": [0, 1, 2, 3], "subclass_class": [0, 0, 1, 1], "within_freq": [0.25, 0.75, 0.5, 0.5]}
    idx, w = subclass.class_subclasses(meta, 0)
    assert idx.tolist() == [0, 1] and np.allclose(w, [0.25, 0.75])
    with pytest.raises(CedmError, match="class 5 does not exist"):
        subclass.class_subclasses(meta, 5)
    with pytest.raises(CedmError, match="needs a sub-class model"):
        subclass.class_subclasses({"raw_labels": [0, 1]}, 0)
    with pytest.raises(CedmError, match="label counts differ"):
        subclass.within_labels(np.zeros((3, 2)), np.zeros(4), progress=False)


def test_balance_counts():
    assert subclass.balance_counts({0: 50, 1: 10, 2: 30}) == {0: 0, 1: 40, 2: 20}
    assert subclass.balance_counts({0: 50, 1: 10}, target=60) == {0: 10, 1: 50}
    with pytest.raises(CedmError):
        subclass.balance_counts({})


@pytest.mark.slow
def test_subclass_model_samples_by_class_and_balances(tmp_path):
    import csv

    from cedm.cli import main
    from cedm.io import load_json

    run = str(tmp_path / "run")
    assert main(["data", "--run-dir", run, "--dataset", "digits", "--limit", "400"]) == 0
    assert main(["features", "--run-dir", run]) == 0
    res = subclass.run(run, method="kmeans", max_sub=2, progress=False)
    assert res["clusters"] == sum(p["subclasses"] for p in res["per_class"]) and res["clusters"] > 10
    cond = "kmeans-K2"
    assert main(["train", "--run-dir", run, "--cond", cond, "--mimg", "0.0005"]) == 0
    meta = load_json(tmp_path / "run" / "train" / cond / "network.json")
    assert meta["label_dim"] == res["clusters"] and len(meta["subclass_class"]) == res["clusters"]

    # --class 3 draws only sub-classes of class 3
    assert main(["sample", "--run-dir", run, "--cond", cond, "--num", "12", "--class", "3"]) == 0
    z = np.load(tmp_path / "run" / "sample" / cond / "images.npz")
    assert set(np.asarray(meta["subclass_class"])[z["clusters"]].tolist()) == {3}
    assert main(["sample", "--run-dir", run, "--cond", cond, "--num", "4", "--class", "42", "--force"]) == 2

    # --balance: exactly the images that bring every class to the target
    labels = np.load(tmp_path / "run" / "data" / "labels.npy")
    counts = np.bincount(labels)
    target = int(counts.max()) + 2
    assert main(["sample", "--run-dir", run, "--cond", cond, "--balance", "--balance-to", str(target)]) == 0
    out = tmp_path / "run" / "balanced" / cond
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    got = np.bincount([int(r["label"]) for r in rows], minlength=len(counts))
    assert (got + counts == target).all()
    assert all((out / r["file_name"]).exists() for r in rows)
    from torchvision.datasets import ImageFolder

    assert len(ImageFolder(str(out), allow_empty=True)) == len(rows)
