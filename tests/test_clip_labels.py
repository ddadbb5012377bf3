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
NAMES = ["red_thing", "blue_thing"]                 # '_' is read as a space in the prompts


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
    names = [n.replace("_", " ") for n in NAMES]
    prompts = tok([t.format(n) for n in names for t in clip_labels.TEMPLATES])
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
    np.testing.assert_array_equal(labels, _restated_labels(cfg, weights, images, ["red thing", "blue thing"]))
    assert s["accuracy"] == 1.0 and s["counts"] == [20, 20]
    assert s["class_names"] == ["red thing", "blue thing"] and s["templates"] == list(clip_labels.TEMPLATES)
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
