"""cedm.features: pixels backbone (training-set statistics), timm backbone from a local weight
file, offline hub / missing weights errors, resumable chunks (issue 3)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cedm import cli, data, features
from cedm.io import CedmError, RunDir


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def digits_run(tmp_path):
    data.run(tmp_path / "run", "digits", limit=200)
    return RunDir(tmp_path / "run")


def test_pixels_backbone_standardises_with_training_statistics(digits_run):
    rd = digits_run
    assert cli.main(["features", "--run-dir", str(rd.root), "--chunk", "64", "--batch-size", "50"]) == 0
    z = np.load(rd.features / "features.npy")
    images = np.load(rd.data / "images.npy")
    assert z.shape == (200, 8 * 8 * 3) and z.dtype == np.float32
    std = images.reshape(200, -1).std(0)
    floor = 0.1 * np.median(std[std > 0])
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0)[std > floor], 1, atol=1e-3)
    # (almost) constant pixels are floored, not blown up: their spread stays below 1
    assert (z.std(0)[std <= floor] < 1).all()
    assert not (rd.features / "chunks").exists()
    man = json.loads((rd.features / "manifest.json").read_text())
    assert man["config"]["backbone"] == "pixels" and man["shape"] == [200, 192]
    # evaluation API: new images are standardised with the stored training statistics
    g = features.load_backbone(rd.root)
    np.testing.assert_allclose(g(images[:7]), z[:7], rtol=1e-5, atol=1e-5)
    new = np.full((2, 8, 8, 3), 255, np.uint8)
    mean, std = np.load(rd.features / "pixel_mean.npy"), np.load(rd.features / "pixel_std.npy")
    np.testing.assert_allclose(g(new), (255 - mean) / std * np.ones((2, 1)), rtol=1e-5)
    # extract(name) on the training images computes the statistics from them
    np.testing.assert_allclose(features.extract(images, "pixels"), z, rtol=1e-5, atol=1e-5)
    with pytest.raises(CedmError, match="8, 8, 3|192"):
        g(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(CedmError, match="uint8"):
        g(np.zeros((1, 8, 8, 3), np.float32))


def test_resumes_from_chunks(digits_run, tmp_path, monkeypatch):
    rd = digits_run
    calls, killed = [], []
    real = features.Backbone.__call__

    def flaky(self, images, **kw):
        calls.append(len(images))
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise KeyboardInterrupt                          # killed while embedding chunk 3
        return real(self, images, **kw)

    monkeypatch.setattr(features.Backbone, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        features.run(rd.root, chunk=50)
    assert sorted(p.name for p in (rd.features / "chunks").glob("chunk_*.npy")) == ["chunk_000000.npy", "chunk_000001.npy"]
    assert not (rd.features / "manifest.json").exists()
    calls.clear()
    features.run(rd.root, chunk=50)
    n_test = len(np.load(rd.data / "test_images.npy"))
    assert calls == [50, 50, n_test]          # only the two missing chunks (+ the held-out split, Table 3)
    monkeypatch.setattr(features.Backbone, "__call__", real)
    data.run(tmp_path / "fresh", "digits", limit=200)
    features.run(tmp_path / "fresh")
    np.testing.assert_array_equal(np.load(rd.features / "features.npy"),
                                  np.load(RunDir(tmp_path / "fresh").features / "features.npy"))
    assert features.run(rd.root, chunk=50)["skipped"]


def test_features_report_the_20nn_accuracy_of_the_heldout_split(digits_run):
    """The paper's Table 3 (docs/method.md#knn-accuracy): the held-out images' features against
    the training features, k = 20, cosine; only for a labelled dataset with a held-out split."""
    from cedm.knn import knn_accuracy

    rd = digits_run
    features.run(rd.root)
    r = json.loads((rd.features / "knn_accuracy.json").read_text())
    man = json.loads((rd.features / "manifest.json").read_text())
    assert man["knn_accuracy"] == r["accuracy"] and "knn_accuracy" in man["outputs"]
    test_images, test_labels = np.load(rd.data / "test_images.npy"), np.load(rd.data / "test_labels.npy")
    assert (r["k"], r["metric"], r["num_train"], r["num_test"]) == (20, "cosine", 200, len(test_images))
    held = features.load_backbone(rd.root)(test_images)
    again = knn_accuracy(np.load(rd.features / "features.npy"), np.load(rd.data / "labels.npy"), held, test_labels)
    assert again == r
    assert r["temperature"] == 0.02 and r["dino"]["temperature"] == 0.07   # TEMI's T, DINO's beside it
    assert 0.7 < r["accuracy"] <= r["accuracy_top5"] <= 1.0   # digits in standardised pixels: easy for 20-NN
    assert 0.7 < r["dino"]["accuracy"] <= 1.0
    # an unlabelled held-out split: no accuracy, and no stale file from before
    (rd.data / "test_labels.npy").unlink()
    dman = json.loads((rd.data / "manifest.json").read_text())
    dman["files"].pop("test_labels.npy")            # as a data stage that never wrote it records it
    (rd.data / "manifest.json").write_text(json.dumps(dman))
    features.run(rd.root, force=True)
    assert not (rd.features / "knn_accuracy.json").exists()
    assert "knn_accuracy" not in json.loads((rd.features / "manifest.json").read_text())


def test_features_of_a_three_class_dataset_report_its_20nn_accuracy(tmp_path, capsys):
    """AFHQv2-64 has 3 classes: `cedm features` embedded everything and then died in the top-5 of
    the 20-NN accuracy (TEMI's narrows to 5 columns of a 3-class ranking). An EDM-format zip with
    3 classes and a labelled held-out zip, through the CLI: exit 0, every class in the top 5."""
    from test_data import _edm_zip

    _edm_zip(tmp_path / "train.zip", n=30)                    # labels i % 3
    _edm_zip(tmp_path / "test.zip", n=9)
    run = str(tmp_path / "run")
    assert cli.main(["data", "--run-dir", run, "--dataset", "folder", "--source", str(tmp_path / "train.zip"),
                     "--test-source", str(tmp_path / "test.zip")]) == 0
    rc = cli.main(["features", "--run-dir", run, "--backbone", "pixels"])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err
    r = json.loads((RunDir(run).features / "knn_accuracy.json").read_text())
    assert (r["k"], r["num_train"], r["num_test"], r["accuracy_top5"]) == (20, 30, 9, 1.0)


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def test_timm_backbone_from_a_local_weight_file(tmp_path, offline):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()   # a "pretrained" file
    wfile = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wfile))
    partial = tmp_path / "partial.safetensors"                 # one block missing: must not load
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "blocks.11." not in k}, str(partial))
    with pytest.raises(CedmError, match="cannot load pretrained weights.*blocks.11"):
        features.make_backbone("vit_tiny_patch16_224", partial)
    data.run(tmp_path / "run", "digits", limit=6)
    rd = RunDir(tmp_path / "run")
    assert cli.main(["features", "--run-dir", str(rd.root), "--backbone", "vit_tiny_patch16_224",
                     "--weights", str(wfile), "--batch-size", "4"]) == 0
    z = np.load(rd.features / "features.npy")
    assert z.shape == (6, 192)
    # reference (the TEMI/DINO embedding code): torchvision Resize(224, BICUBIC) on the PIL image,
    # ToTensor, the model's mean/std (0.5 for this model), fp32, CLS token
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    imgs = np.load(rd.data / "images.npy")
    x = torch.stack([tf(Image.fromarray(im)) for im in imgs])
    with torch.no_grad():
        ref = model.forward_features(x)[:, 0]
    np.testing.assert_allclose(z, ref.numpy(), rtol=1e-4, atol=1e-4)
    g = features.load_backbone(rd.root)
    assert (g.resize, g.precision) == ("pil", "fp32")
    np.testing.assert_allclose(g(imgs[:2]), z[:2], rtol=1e-4, atol=1e-4)
    # --resize torch: the earlier torch bicubic + antialias on floats, a different input
    assert cli.main(["features", "--run-dir", str(rd.root), "--backbone", "vit_tiny_patch16_224", "--force",
                     "--weights", str(wfile), "--batch-size", "4", "--resize", "torch"]) == 0
    zt = np.load(rd.features / "features.npy")
    xt = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    xt = torch.nn.functional.interpolate(xt, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        ref_t = model.forward_features((xt - 0.5) / 0.5)[:, 0]
    np.testing.assert_allclose(zt, ref_t.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(zt, z, rtol=1e-4, atol=1e-4)
    # a features stage written before resize/precision were recorded reloads as it was made
    man = json.loads((rd.features / "manifest.json").read_text())
    for k in ("resize", "precision"):
        del man["config"][k]
    (rd.features / "manifest.json").write_text(json.dumps(man))
    assert features.load_backbone(rd.root).resize == "torch"


def test_pil_resize_is_pil_bicubic_and_keeps_uint8():
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    out = features.pil_resize(torch.from_numpy(imgs), (224, 224))
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224, 3)
    for im, o in zip(imgs, out.numpy()):
        np.testing.assert_array_equal(o, np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)))
    with pytest.raises(CedmError, match="--resize"):
        features.Backbone("pixels", resize="bilinear")


def test_missing_weights_are_errors_never_random_init(tmp_path, offline, capsys):
    data.run(tmp_path / "run", "digits", limit=6)
    rd = RunDir(tmp_path / "run")
    run = ["features", "--run-dir", str(rd.root)]
    assert cli.main(run + ["--backbone", "vit_tiny_patch16_224"]) == 2          # offline hub, no cache
    assert "cannot load pretrained weights for vit_tiny_patch16_224" in capsys.readouterr().err
    assert cli.main(run + ["--backbone", "vit_tiny_patch16_224", "--weights", str(tmp_path / "no.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"unrelated": torch.zeros(3)}, str(bad))
    assert cli.main(run + ["--backbone", "vit_tiny_patch16_224", "--weights", str(bad)]) == 2
    assert "cannot load pretrained weights" in capsys.readouterr().err
    assert cli.main(run + ["--backbone", "not_a_model_xyz"]) == 2
    assert "unknown backbone" in capsys.readouterr().err
    assert not rd.features.exists()


def test_open_clip_backbone_uses_its_own_preprocessing(tmp_path, offline):
    """--backbone open_clip:<model>: CLIP's projected image embedding of its own evaluation
    transform (the paper's Fig. 4; docs/method.md#backbones), on a tiny open_clip model built
    here with random weights; missing weights are an error, never a random init."""
    import open_clip
    from PIL import Image

    cfg = tmp_path / "cedm-tiny-clip-bb.json"
    cfg.write_text(json.dumps({"embed_dim": 12, "vision_cfg": {"image_size": 24, "layers": 1, "width": 32,
                                                               "head_width": 16, "patch_size": 8},
                               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16,
                                            "heads": 2, "layers": 1}}))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    net, _, pre = open_clip.create_model_and_transforms("cedm-tiny-clip-bb", pretrained=None)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 32, 3), dtype=np.uint8)
    g = features.make_backbone("open_clip:cedm-tiny-clip-bb", weights=tmp_path / "w.pt")
    z = g(images, batch_size=2)
    with torch.no_grad():
        want = net.eval().encode_image(torch.stack([pre(Image.fromarray(im)) for im in images])).numpy()
    assert z.shape == (5, 12) and g.dim == 12
    np.testing.assert_allclose(z, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(CedmError, match="--weights FILE"):
        features.make_backbone("open_clip:cedm-tiny-clip-bb")
    with pytest.raises(CedmError, match="cannot load CLIP weights"):
        features.make_backbone("open_clip:cedm-tiny-clip-bb/openai")        # no such tag for it: no random init


def test_fig4_backbones_are_real_names():
    """Every Fig. 4 backbone the libraries provide is a name they know, with published weights."""
    import open_clip
    import timm

    fig4 = features.FIG4_BACKBONES
    assert set(fig4) == {"DINO", "DINOv2", "MoCo v3", "iBOT", "CLIP"}
    for name in filter(None, fig4.values()):
        if name.startswith(features.OPEN_CLIP):
            model, _, tag = name[len(features.OPEN_CLIP):].partition("/")
            assert (model, tag) in open_clip.list_pretrained(), name
        else:
            assert name in timm.list_pretrained(name), name
    assert fig4["MoCo v3"] is None and fig4["iBOT"] is None
    assert not timm.list_pretrained("*moco*") and not timm.list_pretrained("*ibot*")


def test_shards_in_parallel_then_gather_give_the_same_features(digits_run, tmp_path, monkeypatch, capsys):
    """`cedm features --shard I/N` on N pods, then `--gather-shards N`: the features.npy of one
    run, byte for byte; a shard rerun resumes; a missing shard is named; nothing half-written."""
    rd = digits_run
    data.run(tmp_path / "one", "digits", limit=200)
    features.run(tmp_path / "one", chunk=30)                   # 7 chunks
    base = cli.main
    for i in (0, 2):
        assert base(["features", "--run-dir", str(rd.root), "--chunk", "30", "--shard", f"{i}/3"]) == 0
    assert not (rd.features / "manifest.json").exists()
    rc = base(["features", "--run-dir", str(rd.root), "--chunk", "30", "--gather-shards", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "shard(s) 1 not done" in err and "--shard I/3" in err
    assert not (rd.features / "features.npy").exists()
    calls = []
    real = features.Backbone.__call__
    monkeypatch.setattr(features.Backbone, "__call__", lambda self, images, **kw: calls.append(len(images))
                        or real(self, images, **kw))
    assert base(["features", "--run-dir", str(rd.root), "--chunk", "30", "--shard", "1/3"]) == 0
    assert base(["features", "--run-dir", str(rd.root), "--chunk", "30", "--shard", "1/3"]) == 0   # resumes
    assert calls == [30, 30]                                   # shard 1 = chunks 2 and 3, computed once
    calls.clear()
    assert base(["features", "--run-dir", str(rd.root), "--chunk", "30", "--gather-shards", "3"]) == 0
    assert calls == [len(np.load(rd.data / "test_images.npy"))]   # only the held-out split (Table 3)
    np.testing.assert_array_equal(np.load(rd.features / "features.npy"),
                                  np.load(RunDir(tmp_path / "one").features / "features.npy"))
    assert not (rd.root / features.SHARDS).exists() and not (rd.features / "chunks").exists()
    assert base(["features", "--run-dir", str(rd.root), "--chunk", "30", "--shard", "0/3"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert [c for k in range(3) for c in features.shard_chunks(7, (k, 3))] == list(range(7))
    for bad in ("3/3", "1", "a/2", "-1/2"):
        assert base(["features", "--run-dir", str(rd.root), f"--shard={bad}"]) == 2
        assert "--shard must be I/N" in capsys.readouterr().err
