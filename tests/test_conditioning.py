"""Conditioning tags (cedm.conditioning): one grammar, one place that maps a tag to its labels."""
import pytest

from cedm import conditioning as cnd
from cedm.io import CedmError


@pytest.mark.parametrize("tag,parsed", [
    ("uncond", ("uncond", None, None)), ("labels", ("labels", None, None)),
    ("temi-C20", ("clusters", "temi", 20)), ("kmeans-C5", ("clusters", "kmeans", 5)),
    ("ap-K10", ("subclasses", "ap", 10)), ("skmeans-C7", ("clusters", "skmeans", 7)),
    ("labels:coarse", ("labels", "coarse", None)), ("labels:clip", ("labels", "clip", None)),
])
def test_parse_and_print_round_trip(tag, parsed):
    t = cnd.parse_tag(tag)
    assert tuple(t) == parsed and str(t) == tag
    kind, method, count = t                                       # unpacks like a 3-tuple
    assert (kind, method, count) == parsed


@pytest.mark.parametrize("bad", ["temi_C5", "temi-C", "TEMI-C5", "temi-X5", "labels:fine", "", "c5",
                                 "labels:", "labels-fine", "spherical-kmeans-C5"])
def test_bad_tags_are_clear_errors(bad):
    with pytest.raises(CedmError, match="unknown --cond"):
        cnd.parse_tag(bad)
    assert not cnd.is_tag(bad)


def test_paths_and_helpers(tmp_path):
    assert cnd.cluster_dir(tmp_path, "temi-C5") == tmp_path / "cluster/temi-C5"
    assert cnd.cluster_dir(tmp_path, "ap-K3") == tmp_path / "cluster/ap-K3"
    assert cnd.cluster_dir(tmp_path, "labels") is None
    assert cnd.cluster_of("temi-C20") == ("temi", 20) and cnd.cluster_of("ap-K3") is None
    assert cnd.cluster_tag("temi", 7) == "temi-C7" and cnd.subclass_tag("ap", 4) == "ap-K4"
    order = sorted(["uncond", "temi-C100", "labels", "temi-C20", "kmeans-C50", "ap-K3"], key=cnd.sort_key)
    assert order == ["kmeans-C50", "temi-C20", "temi-C100", "ap-K3", "labels", "uncond"]
    assert [cnd.telemetry_label(t) for t in ("temi-C20", "ap-K3", "uncond")] == ["20", "ap-K3", "uncond"]


def test_train_still_exports_parse_tag():
    from cedm import train

    assert train.parse_tag is cnd.parse_tag and train.conditioning is cnd.conditioning


def _coarse_run(root, coarse=True):
    """A tiny CIFAR-100-like run: 12 images, 6 fine labels, 3 coarse ones (fine // 2)."""
    import numpy as np

    from cedm.io import RunDir, save_array, write_manifest

    rd = RunDir(root)
    rng = np.random.default_rng(0)
    fine = np.arange(12, dtype=np.int64) % 6
    save_array(rd.data / "images.npy", rng.integers(0, 255, size=(12, 8, 8, 3)).astype(np.uint8))
    save_array(rd.data / "labels.npy", fine)
    if coarse:
        save_array(rd.data / "coarse_labels.npy", fine // 2)
    write_manifest(rd.data, "data", {"dataset": "digits", "resolution": 8, "num_classes": 6})
    return rd


def test_coarse_labels_condition_on_the_super_classes_in_a_safe_folder(tmp_path):
    """labels:coarse (the paper's Table 2) reads data/coarse_labels.npy; its folders have no ':'
    and the folder name parses back to the tag (report lists train/ folders)."""
    import numpy as np

    rd = _coarse_run(tmp_path / "run")
    c = cnd.conditioning(rd.root, "labels:coarse", 12)
    assert (c["kind"], c["method"], c["label_dim"], c["raw_labels"]) == ("labels", "coarse", 3, [0, 1, 2])
    np.testing.assert_array_equal(c["index"], (np.arange(12) % 6) // 2)
    assert cnd.conditioning(rd.root, "labels", 12)["label_dim"] == 6            # the fine ones unchanged
    assert cnd.folder("labels:coarse") == "labels-coarse" and cnd.folder("temi-C5") == "temi-C5"
    assert str(cnd.parse_tag("labels-coarse")) == "labels:coarse"
    assert rd.train("labels:coarse") == rd.root / "train/labels-coarse" == rd.train("labels-coarse")
    assert rd.eval("labels:coarse").name == rd.sample("labels:coarse").name == "labels-coarse"
    assert cnd.telemetry_label("labels:coarse") == "labels:coarse" and cnd.telemetry_label("labels") == "labels"
    assert cnd.cluster_dir(rd.root, "labels:coarse") is None and cnd.cluster_of("labels:coarse") is None
    bare = _coarse_run(tmp_path / "bare", coarse=False)
    with pytest.raises(CedmError, match="coarse_labels.npy"):
        cnd.conditioning(bare.root, "labels:coarse", 12)


def test_cedm_train_cond_labels_coarse(tmp_path, capsys):
    """`cedm train --cond labels:coarse` trains a 3-label model into train/labels-coarse/."""
    import json

    from cedm import cli

    rd = _coarse_run(tmp_path / "run")
    argv = ["train", "--run-dir", str(rd.root), "--cond", "labels:coarse", "--network", "tiny",
            "--batch-size", "4", "--mimg", str(2 * 4e-6), "--lr-ramp-mimg", "0.0001", "--device", "cpu"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    meta = json.loads((rd.root / "train/labels-coarse/network.json").read_text())
    assert meta["label_dim"] == 3 and meta["tag"] == "labels:coarse" and meta["kind"] == "labels"
    assert not (rd.root / "train/labels:coarse").exists()
    # the folder spelling names the same conditioning everywhere: the same run is skipped, and
    # sampling it by either spelling finds the model
    assert cli.main(argv[:4] + ["labels-coarse"] + argv[5:]) == 0
    assert "skipped" in capsys.readouterr().err
    assert cli.main(["sample", "--run-dir", str(rd.root), "--cond", "labels-coarse", "--num", "2",
                     "--steps", "2", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert json.loads((rd.root / "sample/labels-coarse/manifest.json").read_text())["config"]["cond"] == \
        "labels:coarse"
    bare = _coarse_run(tmp_path / "bare", coarse=False)
    assert cli.main(argv[:2] + [str(bare.root)] + argv[3:]) == 2
    assert "coarse_labels.npy" in capsys.readouterr().err and not (bare.root / "train").exists()


def test_train_help_lists_every_label_conditioning():
    """`cedm train --help` names every tag form the grammar accepts, labels:coarse included."""
    from cedm.cli import build_parser

    sub = [a for a in build_parser()._actions if a.dest == "command"][0]
    cond = [a for a in sub.choices["train"]._actions if a.dest == "cond"][0]
    for form in ["labels", "uncond", "<method>-C<C>", "<method>-K<K>"] + [f"labels:{k}" for k in cnd.label_set_names()]:
        assert f"'{form}'" in cond.help, form
    assert "'labels:coarse'" in cond.help and "'labels:clip'" in cond.help
