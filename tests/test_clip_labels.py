"""cedm.clip_labels: zero-shot CLIP pseudo-labels (the paper's Table 2, tag labels:clip;
docs/method.md#clip-labels), run end to end on a tiny open_clip model built here (no download)."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

from cedm import cli, clip_labels, conditioning
from cedm.io import CedmError, RunDir, save_array, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
NAMES = ["red_thing", "blue_thing"]                 # kept as written, as PLP prompts torchvision's names


def _images(n, rng):
    """Reddish and bluish 32x32 images, alternating, with their class ids."""
    y = np.arange(n) % 2
    x = rng.integers(0, 90, (n, 32, 32, 3)).astype(np.int64)
    x[y == 0, ..., 0] += 150
    x[y == 1, ..., 2] += 150
    return x.clip(0, 255).astype(np.uint8), y


def _run_dir(root, images, labels, names=NAMES):
    rd = RunDir(root)
    save_array(rd.data / "images.npy", images)
    save_array(rd.data / "labels.npy", labels)
    write_manifest(rd.data, "data", {"dataset": "folder", "resolution": 32},
                   extra={"class_names": names} if names else None)
    return rd


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip model, random, then fitted for a few steps so that its zero-shot head
    (the five prompts of each class name) tells the two colours apart; saved as a weight file."""
    d = tmp_path_factory.mktemp("clip")
    cfg = d / "cedm-tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    net, _, preprocess = open_clip.create_model_and_transforms("cedm-tiny-clip", pretrained=None)
    tok = open_clip.get_tokenizer("cedm-tiny-clip")
    from PIL import Image

    images, y = _images(64, np.random.default_rng(0))
    x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    prompts = tok([t.format(n) for n in NAMES for t in clip_labels.TEMPLATES])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(40):
        t = torch.nn.functional.normalize(net.encode_text(prompts), dim=-1).view(2, 5, -1).mean(1)
        t = torch.nn.functional.normalize(t, dim=-1)
        z = torch.nn.functional.normalize(net.encode_image(x), dim=-1)
        loss = torch.nn.functional.cross_entropy(net.logit_scale.exp() * z @ t.T, torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = d / "tiny.pt"
    torch.save(net.state_dict(), weights)
    return cfg, weights


def _restated_labels(cfg, weights, images, names):
    """The zero-shot rule written out: five prompts per name, normalised, averaged, normalised;
    images normalised; argmax of the softmax over classes."""
    from PIL import Image

    open_clip.add_model_config(cfg)
    net, _, pre = open_clip.create_model_and_transforms("cedm-tiny-clip", pretrained=str(weights))
    tok = open_clip.get_tokenizer("cedm-tiny-clip")
    with torch.no_grad():
        cls = []
        for n in names:
            e = net.encode_text(tok([f"a photo of a {n}.", f"a blurry photo of a {n}.", f"a photo of many {n}.",
                                     f"a photo of the large {n}.", f"a photo of the small {n}."]))
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            cls.append(e / e.norm())
        z = net.encode_image(torch.stack([pre(Image.fromarray(im)) for im in images]))
        z = z / z.norm(dim=-1, keepdim=True)
        return (100.0 * z @ torch.stack(cls).T).softmax(-1).argmax(-1).numpy()


def test_two_class_clip_pseudo_labels_on_a_tiny_model(tmp_path, tiny_clip, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, weights = tiny_clip
    images, y = _images(40, np.random.default_rng(1))               # not the images it was fitted on
    rd = _run_dir(tmp_path / "run", images, y)
    s = clip_labels.run(rd.root, model="cedm-tiny-clip", weights=weights, model_config=cfg, batch_size=16,
                        device="cpu")
    labels = np.load(rd.root / "clip" / "labels.npy")
    assert labels.dtype == np.int64 and labels.shape == (40,)
    np.testing.assert_array_equal(labels, _restated_labels(cfg, weights, images, NAMES))
    assert s["accuracy"] == 1.0 and s["counts"] == [20, 20]
    assert s["class_names"] == NAMES and s["templates"] == list(clip_labels.TEMPLATES)
    assert "coarse" not in s and not (rd.root / "clip" / "coarse_labels.npy").exists()   # not CIFAR-100
    assert len(s["templates"]) == 5 and s["pretrained"] is None
    # its own conditioning tag, trained next to labels (cedm.conditioning)
    assert conditioning.label_tags(rd.root) == ["labels", "labels:clip"]
    c = conditioning.conditioning(rd.root, "labels:clip", 40)
    assert c["label_dim"] == 2 and c["inputs"] == [rd.root / "clip"]
    np.testing.assert_array_equal(c["index"], labels)
    assert conditioning.folder("labels:clip") == "labels-clip" and str(conditioning.parse_tag("labels-clip")) == "labels:clip"
    # the same config again: reused, not recomputed
    assert clip_labels.run(rd.root, model="cedm-tiny-clip", weights=weights, model_config=cfg, batch_size=16,
                           device="cpu") == s


def test_clip_labels_errors(tmp_path, tiny_clip, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, weights = tiny_clip
    images, y = _images(4, np.random.default_rng(2))
    rd = _run_dir(tmp_path / "run", images, y)
    with pytest.raises(CedmError, match="labels:clip needs"):
        conditioning.conditioning(rd.root, "labels:clip", 4)
    with pytest.raises(CedmError, match="labels:clip-coarse needs .*CIFAR-100 only"):
        conditioning.conditioning(rd.root, "labels:clip-coarse", 4)
    with pytest.raises(CedmError, match="no such file"):
        clip_labels.run(rd.root, model="cedm-tiny-clip", weights=tmp_path / "nope.pt", model_config=cfg)
    with pytest.raises(CedmError, match="unknown open_clip model"):
        clip_labels.run(rd.root, model="no-such-clip", weights=weights)
    # the default, the paper's ViT-G/14, is never replaced by a random init when it cannot be had
    assert (clip_labels.DEFAULT_MODEL, clip_labels.DEFAULT_PRETRAINED) == ("ViT-bigG-14", "laion2b_s39b_b160k")
    with pytest.raises(CedmError, match="cannot load CLIP weights for cedm-tiny-clip from laion2b_s39b_b160k"):
        clip_labels.load_model("cedm-tiny-clip", clip_labels.DEFAULT_PRETRAINED, model_config=cfg)
    unnamed = _run_dir(tmp_path / "unnamed", images, y, names=None)
    with pytest.raises(CedmError, match="class names"):
        clip_labels.run(unnamed.root, model="cedm-tiny-clip", weights=weights, model_config=cfg)
    assert not (unnamed.root / "clip").exists() and not (rd.root / "clip" / "manifest.json").exists()


def test_clip_labels_command_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images, y = _images(4, np.random.default_rng(3))
    rd = _run_dir(tmp_path / "run", images, y)
    rc = cli.main(["clip-labels", "--run-dir", str(rd.root), "--weights", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("cedm clip-labels: error:") and "no such file" in err


# torchvision's CIFAR100.classes (= the meta file's fine_label_names) where they hold '_'; PLP prompts them so
CIFAR100_UNDERSCORED = ["aquarium_fish", "lawn_mower", "maple_tree", "oak_tree", "palm_tree", "pickup_truck",
                        "pine_tree", "sweet_pepper", "willow_tree"]


def test_plp_class_names_and_the_20_superclass_zero_shot(tmp_path, tiny_clip, monkeypatch):
    """As PLP makes them (HHU-MMBS/plp-official-tmlr2024, eval/utils.py clip_label_embeddings:
    get_class_names -> torchvision's `.classes`, no '_' replaced; loaders/cifar20.py for CIFAR20):
    a CIFAR-100 run gets labels:clip over its (underscored) class names and, from the same image
    embeddings, labels:clip-coarse over PLP's 20 super-class names; both train."""
    from cedm import train
    from cedm.plan import conditionings

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, weights = tiny_clip
    images, y = _images(24, np.random.default_rng(4))
    rd = RunDir(tmp_path / "run")
    save_array(rd.data / "images.npy", images)
    save_array(rd.data / "labels.npy", y)
    save_array(rd.data / "coarse_labels.npy", y % 20)
    names = NAMES + CIFAR100_UNDERSCORED
    coarse_meta = [f"super_{i}" for i in range(20)]      # the meta file's coarse names: not what PLP prompts
    write_manifest(rd.data, "data", {"dataset": "cifar100", "resolution": 32},
                   extra={"class_names": names, "coarse_class_names": coarse_meta})
    s = clip_labels.run(rd.root, model="cedm-tiny-clip", weights=weights, model_config=cfg, device="cpu")
    assert s["class_names"] == names                                       # underscores kept
    np.testing.assert_array_equal(np.load(rd.root / "clip" / "labels.npy"),
                                  _restated_labels(cfg, weights, images, names))
    assert len(clip_labels.PLP_CIFAR20_NAMES) == 20 and clip_labels.PLP_CIFAR20_NAMES[6] == "househould furniture"
    coarse = np.load(rd.root / "clip" / "coarse_labels.npy")
    np.testing.assert_array_equal(coarse, _restated_labels(cfg, weights, images, list(clip_labels.PLP_CIFAR20_NAMES)))
    assert s["coarse"]["class_names"] == list(clip_labels.PLP_CIFAR20_NAMES)
    assert s["coarse"]["accuracy"] == (coarse == y % 20).mean() and sum(s["coarse"]["counts"]) == 24
    # its own tag, offered to the sweep beside the 100-class one (cedm conds, cedm sweep), and trained
    tags = conditioning.label_tags(rd.root)
    assert tags == ["labels", "labels:coarse", "labels:clip", "labels:clip-coarse"]
    assert "labels:clip-coarse" in conditionings([10], None, labels=tags)[0]
    assert conditioning.folder("labels:clip-coarse") == "labels-clip-coarse"
    assert str(conditioning.parse_tag("labels-clip-coarse")) == "labels:clip-coarse"
    c = conditioning.conditioning(rd.root, "labels:clip-coarse", 24)
    np.testing.assert_array_equal(np.asarray(c["raw_labels"])[c["index"]], coarse)
    meta = train.run(rd.root, "labels:clip-coarse", network="tiny", batch_size=8, lr=2e-3, lr_ramp_mimg=0.0001,
                     mimg=8e-6, progress=False)
    used = len(np.unique(coarse))
    assert meta["label_dim"] == (used if used > 1 else 0)
    assert (rd.root / "train" / "labels-clip-coarse" / "network.safetensors").exists()
