"""cedm.judge: the classifier judge (FD in a small digits classifier's features, not FID)."""
import json
import os

import numpy as np
import pytest

from cedm import evaluate, judge
from cedm.data import load_digits
from cedm.io import CedmError, RunDir, save_array, save_json, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


def _make_run(root, images, labels=None):
    d = RunDir(root).data
    d.mkdir(parents=True, exist_ok=True)
    save_array(d / "images.npy", images)
    if labels is not None:
        save_array(d / "labels.npy", labels)
    save_json(d / "manifest.json", {"stage": "data", "num_images": len(images), "shape": list(images.shape)})
    return root


@pytest.fixture(scope="module")
def digits():
    """16-px digits: every 7th image kept out of the run (real held-out digits), the rest trained on."""
    d = load_digits(16)
    out = np.arange(len(d["images"])) % 7 == 3
    return {"train": d["images"][~out], "labels": d["labels"][~out], "heldout": d["images"][out]}


@pytest.fixture(scope="module")
def run_dir(digits, tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("judge"), digits["train"], digits["labels"])


@pytest.fixture(scope="module")
def extractor(run_dir):
    return judge.classifier_extractor(run_dir)


def test_the_classifier_separates_the_digits(extractor, digits):
    assert extractor.trained
    assert extractor.accuracy > 0.9
    n = len(digits["train"])
    assert extractor.n_holdout == round(0.1 * n) and extractor.n_train == n - extractor.n_holdout
    feats = extractor(digits["heldout"][:5])
    assert feats.shape == (5, judge.HIDDEN) and feats.dtype == np.float32


def test_same_data_and_seed_give_identical_features(extractor, digits, tmp_path):
    other = judge.classifier_extractor(_make_run(tmp_path, digits["train"], digits["labels"]))
    assert other.trained and other.accuracy == extractor.accuracy
    np.testing.assert_array_equal(other(digits["heldout"]), extractor(digits["heldout"]))


def test_the_fd_in_its_features_ranks_real_digits_far_closer_than_noise_blur_or_shuffles(extractor, digits):
    from PIL import Image, ImageFilter

    held = digits["heldout"]
    rng = np.random.default_rng(0)
    ref = evaluate.feature_statistics(extractor(digits["train"]))

    def fd(images):
        return evaluate.frechet_distance(evaluate.feature_statistics(extractor(images)), ref)

    noise = rng.integers(0, 256, held.shape, dtype=np.uint8)
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(2))) for im in held])
    flat = held.reshape(len(held), -1, 3)
    shuffled = flat[:, rng.permutation(flat.shape[1])].reshape(held.shape)   # one pixel permutation for all
    real = fd(held)
    others = {"noise": fd(noise), "blurred": fd(blurred), "shuffled": fd(shuffled)}
    assert all(v > 5 * real for v in others.values()), (real, others)


def test_the_classifier_is_cached_once_per_dataset(extractor, run_dir, digits, monkeypatch):
    path = extractor.path
    assert path.parent == RunDir(run_dir).root / "eval" / "_reference" and path.suffix == ".npz"
    mtime = os.stat(path).st_mtime_ns
    monkeypatch.setattr(judge, "_fit", lambda *a: pytest.fail("the cached classifier was retrained"))
    again = judge.classifier_extractor(run_dir)
    assert not again.trained and again.accuracy == extractor.accuracy
    assert os.stat(path).st_mtime_ns == mtime
    np.testing.assert_array_equal(again(digits["heldout"]), extractor(digits["heldout"]))
    with np.load(path, allow_pickle=False) as z:                # plain arrays, no pickles
        assert {"w1", "b1", "accuracy", "classes"} <= set(z.files)


def test_missing_labels_are_a_one_line_error_naming_the_alternatives(digits, tmp_path):
    _make_run(tmp_path, digits["train"][:20])
    for call in (lambda: judge.classifier_extractor(tmp_path),
                 lambda: evaluate.choose_extractor(tmp_path, "classifier", "cpu")):
        with pytest.raises(CedmError, match="labelled dataset") as e:
            call()
        assert "\n" not in str(e.value) and "fid, fdd or backbone" in str(e.value)


def test_evaluate_reports_the_classifier_fd_its_accuracy_and_the_auroc_in_the_backbone_space(tmp_path):
    from test_evaluate import digits_run, fake_samples

    rd, imgs = digits_run(tmp_path, limit=60)
    fake_samples(rd, "labels", imgs[:20])
    m = evaluate.run(tmp_path, "labels", metric="classifier", sets=1, num=20, device="cpu")
    assert m["metric"] == "classifier_fd" and "not FID" in m["label"]
    assert 0 <= m["judge_accuracy"] <= 1 and np.isfinite(m["mean"])
    assert 0 <= m["auroc_1nn"] <= 1                             # still in the backbone's space
    cfg = json.loads((rd.eval("labels") / "manifest.json").read_text())["config"]
    assert cfg["metric"] == "classifier"
    # Another metric is another identity: never the classifier's result passed off as the backbone's.
    with pytest.raises(CedmError, match="metric"):
        evaluate.run(tmp_path, "labels", metric="backbone", sets=1, num=20, device="cpu")


def test_reference_statistics_in_its_features_name_the_classifier(extractor, tmp_path):
    """Statistics cached in the classifier's features carry its version and seed, so a new
    classifier design (judge.VERSION) never reuses an old one's reference statistics."""
    class Extractor:
        cache_tag = "v7-s0"

        def __call__(self, x):
            return np.asarray(x, np.float32).reshape(len(x), -1)[:, :4]

    ext = Extractor()
    rd = RunDir(tmp_path)
    save_array(rd.data / "images.npy", np.random.default_rng(0).integers(0, 255, (20, 4, 4, 3), dtype=np.uint8))
    write_manifest(rd.data, "data", {"dataset": "digits"})
    evaluate.reference_statistics(tmp_path, "classifier_fd", ext)
    assert [p.name.endswith("-all-v7-s0.npz") for p in (rd.root / "eval" / "_reference").iterdir()] == [True]
    assert extractor.cache_tag == f"v{judge.VERSION}-s0"       # the real judge's: version and seed


# ----------------------------------------------------------------------------------------------
# Class/cluster consistency (docs/method.md#consistency)

def restated_consistency(judged, groups, train_groups, train_labels):
    """The definition, written out: for each image of group c, is the judge's class c's majority
    class among the training images of c (the most frequent label; ties: the smaller)?"""
    hits = []
    for j, g in zip(judged, groups):
        labels_of_g = [y for tg, y in zip(train_groups, train_labels) if tg == g]
        if not labels_of_g:
            hits.append(False)
            continue
        best = max(sorted(set(labels_of_g)), key=labels_of_g.count)
        hits.append(j == best)
    return sum(hits) / len(hits)


def test_consistency_against_its_restated_definition():
    rng = np.random.default_rng(3)
    train_groups = rng.integers(0, 7, 300)
    train_labels = (train_groups + (rng.random(300) < 0.3) * rng.integers(1, 4, 300)) % 5   # mostly g % 5
    groups = rng.integers(0, 8, 200)                  # group 7 has no training image
    judged = np.where(rng.random(200) < 0.6, groups % 5, rng.integers(0, 5, 200))
    maj = judge.majority_class(train_groups, train_labels)
    got = judge.consistency(judged, groups, maj)
    assert got["rate"] == pytest.approx(restated_consistency(judged, groups, train_groups, train_labels))
    assert 7 not in maj and got["per_group"][7][0] == 0.0
    n6 = int((groups == 6).sum())
    assert got["per_group"][6] == [pytest.approx(np.mean(judged[groups == 6] == maj[6])), n6]


def test_majority_class_of_ground_truth_labels_is_the_class_itself():
    y = np.array([3, 1, 3, 0, 1, 1])
    assert judge.majority_class(y, y) == {0: 0, 1: 1, 3: 3}
    assert judge.majority_class(np.array([0, 0, 1, 1]), np.array([2, 1, 5, 5])) == {0: 1, 1: 5}   # tie -> smaller


def test_the_judge_predicts_held_out_digits_and_their_consistency(extractor, digits):
    """Real held-out digits judged against their own labels: consistency = the judge's accuracy."""
    pred = extractor.predict(digits["heldout"])
    y_held = load_digits(16)["labels"][np.arange(len(load_digits(16)["labels"])) % 7 == 3]
    assert pred.dtype == np.int64 and (pred == y_held).mean() > 0.9
    rate = judge.consistency(pred, y_held, judge.majority_class(digits["labels"], digits["labels"]))["rate"]
    assert rate == pytest.approx((pred == y_held).mean())
    shuffled = judge.consistency(pred, np.random.default_rng(0).permutation(y_held),
                                 judge.majority_class(digits["labels"], digits["labels"]))["rate"]
    assert shuffled < 0.3                              # labels that do not condition: near chance
