"""cedm.data: digits, CIFAR tarballs (checksums, corrupt archives), image folders/zips (issue 3)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from cedm import cli, data
from cedm.io import CedmError, RunDir


def _add(tar, name, obj):
    b = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(b)
    tar.addfile(info, io.BytesIO(b))


def fake_cifar(path, dataset="cifar10", per_batch=4, seed=0):
    """A tarball in the official python-version layout, with tiny pickled batches."""
    rng = np.random.default_rng(seed)
    spec = data.CIFAR[dataset]
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(spec["train"] + spec["test"]):
            n = per_batch if dataset == "cifar10" else 5 * per_batch
            d = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
            if dataset == "cifar10":
                d[b"labels"] = [int(v) for v in rng.integers(0, 10, n)]
            else:
                d[b"fine_labels"] = [int(v) for v in rng.integers(0, 100, n)]
                d[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
            batches[name] = d
            _add(tar, f"{spec['folder']}/{name}", d)
        if dataset == "cifar10":
            _add(tar, f"{spec['folder']}/batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
        else:
            _add(tar, f"{spec['folder']}/meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                                 b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})
    return batches


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_digits(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["data", "--run-dir", run, "--dataset", "digits"]) == 0
    rd = RunDir(run)
    x, y = np.load(rd.data / "images.npy"), np.load(rd.data / "labels.npy")
    assert x.shape == (1618, 8, 8, 3) and x.dtype == np.uint8 and y.shape == (1618,) and y.dtype == np.int64
    assert np.array_equal(x[..., 0], x[..., 2]) and x.max() > 200 and set(y.tolist()) == set(range(10))
    man = json.loads((rd.data / "manifest.json").read_text())
    assert man["config"]["dataset"] == "digits" and man["config"]["resolution"] == 8
    assert man["config"]["num_classes"] == 10
    from sklearn.datasets import load_digits                 # the 8x8 original, its 17 levels scaled to 0..255
    np.testing.assert_array_equal(x[0, ..., 0], np.round(load_digits().images[0] * 255 / 16))
    assert cli.main(["data", "--run-dir", run, "--dataset", "digits"]) == 0
    assert "skipped" in capsys.readouterr().err
    assert cli.main(["data", "--run-dir", run, "--dataset", "digits", "--resolution", "16"]) == 2
    run16 = str(tmp_path / "run16")                          # another resolution: bicubic resampling
    assert cli.main(["data", "--run-dir", run16, "--dataset", "digits", "--resolution", "16"]) == 0
    x16 = np.load(RunDir(run16).data / "images.npy")
    small = np.asarray(Image.fromarray(x16[0, ..., 0]).resize((8, 8), Image.Resampling.BOX), float)
    assert x16.shape == (1618, 16, 16, 3) and np.corrcoef(small.ravel(), load_digits().images[0].ravel())[0, 1] > 0.9
    assert "different config" in capsys.readouterr().err
    assert cli.main(["data", "--run-dir", run, "--dataset", "digits", "--source", "x"]) == 2


def test_cifar10_local_tarball(tmp_path):
    tgz = tmp_path / "cifar-10-python.tar.gz"
    batches = fake_cifar(tgz)
    run = str(tmp_path / "run")
    assert cli.main(["data", "--run-dir", run, "--dataset", "cifar10", "--source", str(tgz),
                     "--md5", md5(tgz)]) == 0
    rd = RunDir(run)
    x, y = np.load(rd.data / "images.npy"), np.load(rd.data / "labels.npy")
    assert x.shape == (20, 32, 32, 3)
    row = batches["data_batch_1"][b"data"][0]                # channel-major rows -> HWC pixels
    assert list(x[0, 0, 0]) == [row[0], row[1024], row[2048]]
    assert list(x[0, 31, 31]) == [row[1023], row[2047], row[3071]]
    assert y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    man = json.loads((rd.data / "manifest.json").read_text())
    assert man["class_names"][3] == "c3" and man["config"]["num_classes"] == 10
    run2 = str(tmp_path / "test")
    assert cli.main(["data", "--run-dir", run2, "--dataset", "cifar10", "--source", str(tgz),
                     "--md5", "skip", "--split", "test", "--limit", "3", "--resolution", "16"]) == 0
    assert np.load(RunDir(run2).data / "images.npy").shape == (3, 16, 16, 3)
    assert np.load(RunDir(run2).data / "labels.npy").tolist() == batches["test_batch"][b"labels"][:3]


def test_cifar100_keeps_fine_and_coarse_labels(tmp_path):
    tgz = tmp_path / "c100.tar.gz"
    batches = fake_cifar(tgz, "cifar100")
    res = data.run(tmp_path / "run", "cifar100", source=str(tgz), md5=md5(tgz))
    rd = RunDir(tmp_path / "run")
    assert res["num_images"] == 20 and res["config"]["num_coarse_classes"] == 20
    assert np.load(rd.data / "labels.npy").tolist() == batches["train"][b"fine_labels"]
    assert np.load(rd.data / "coarse_labels.npy").tolist() == batches["train"][b"coarse_labels"]


def test_checksum_and_corrupt_archives_leave_nothing(tmp_path, capsys):
    tgz = tmp_path / "cifar-10-python.tar.gz"
    fake_cifar(tgz)
    run = tmp_path / "run"
    # default: the published MD5, which a fake tarball does not have
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "cifar10", "--source", str(tgz)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "cifar10", "--source", str(tgz),
                     "--md5", "0" * 32]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    # truncated archive (checksum skipped so the archive reader must notice)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "cifar10", "--source", str(cut),
                     "--md5", "skip"]) == 2
    assert "corrupt or truncated archive" in capsys.readouterr().err
    # a tarball that is not CIFAR, and one whose pickle would run code
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        _add(tar, "something/else", {b"x": 1})
    with pytest.raises(CedmError, match="not a cifar10 python-version archive"):
        data.run(run, "cifar10", source=str(other), md5="skip")
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        for name in data.CIFAR["cifar10"]["train"] + ["batches.meta"]:
            b = pickle.dumps(os.getcwd)                      # a global that is not an array
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    with pytest.raises(CedmError, match="forbidden global"):
        data.run(run, "cifar10", source=str(evil), md5="skip")
    assert not run.exists() or not (run / "data").exists()
    assert not list(tmp_path.glob("run/.data*"))             # no staging leftovers


def test_download_verifies_md5_and_keeps_nothing_on_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("CEDM_CACHE", str(tmp_path / "cache"))
    tgz = tmp_path / "cifar-10-python.tar.gz"
    fake_cifar(tgz)
    url = tgz.as_uri()                                       # file:// goes through urllib like https://
    with pytest.raises(CedmError, match="checksum mismatch"):
        data.run(tmp_path / "run", "cifar10", source=url, md5="f" * 32)
    assert not any((tmp_path / "cache").iterdir())
    res = data.run(tmp_path / "run", "cifar10", source=url, md5=md5(tgz))
    assert res["num_images"] == 20 and (tmp_path / "cache" / tgz.name).exists()
    with pytest.raises(CedmError, match="could not download"):
        data.download((tmp_path / "missing.tar.gz").as_uri(), tmp_path / "cache" / "m.tar.gz", None)
    assert not (tmp_path / "cache" / "m.tar.gz").exists()


def _images(folder):
    folder.mkdir(parents=True)
    band = np.zeros((20, 60, 3), np.uint8)                   # 3 vertical bands: red | green | blue
    band[:, :20, 0] = band[:, 20:40, 1] = band[:, 40:, 2] = 255
    Image.fromarray(band).save(folder / "a_bands.png")
    Image.fromarray(np.full((30, 30), 128, np.uint8), "L").save(folder / "b_grey.png")
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0] = 255                                        # transparent red -> white background
    Image.fromarray(rgba, "RGBA").save(folder / "c_alpha.png")
    (folder / "sub").mkdir()
    Image.fromarray(np.full((40, 32, 3), 50, np.uint8)).convert("P").save(folder / "sub" / "d_pal.gif")
    Image.fromarray(np.full((18, 18, 3), 200, np.uint8)).save(folder / "e.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    (folder / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")


def test_folder_and_zip(tmp_path, capsys):
    src = tmp_path / "imgs"
    _images(src)
    run = tmp_path / "run"
    argv = ["data", "--run-dir", str(run), "--dataset", "folder", "--source", str(src), "--resolution", "16"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "z_broken.png" in err and "--skip-unreadable" in err and not (run / "data").exists()
    assert cli.main(argv + ["--skip-unreadable"]) == 0
    assert "z_broken.png" in capsys.readouterr().err
    x = np.load(RunDir(run).data / "images.npy")
    assert x.shape == (5, 16, 16, 3) and x.dtype == np.uint8 and not (RunDir(run).data / "labels.npy").exists()
    # bands image: shorter side 20 -> 16, width 48, center crop = the green band
    assert x[0, :, 2:14, 1].min() > 240 and x[0, :, 2:14, 0].max() < 15
    assert (x[1] == 128).all()                                # grey -> RGB
    assert x[2, ..., 1].min() > 240                           # transparent -> white
    assert abs(int(x[3, 8, 8, 0]) - 200) <= 3                 # JPEG ("e.jpg" sorts before "sub/")
    assert abs(int(x[4, 8, 8, 0]) - 50) <= 3                  # palette GIF in a sub-folder -> RGB
    man = json.loads((RunDir(run).data / "manifest.json").read_text())
    assert man["skipped"] == ["z_broken.png"] and man["config"]["num_classes"] is None

    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    res = data.run(tmp_path / "zrun", "ffhq64", source=str(zpath), resolution=16, skip_unreadable=True)
    assert res["num_images"] == 5
    np.testing.assert_array_equal(np.load(RunDir(tmp_path / "zrun").data / "images.npy"), x)


def test_empty_datasets_are_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    run = tmp_path / "run"
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "folder", "--source",
                     str(tmp_path / "empty"), "--resolution", "8"]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "digits", "--limit", "0"]) == 2
    assert "empty dataset" in capsys.readouterr().err
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "folder", "--source", str(tmp_path / "nope"),
                     "--resolution", "8"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "folder", "--source", str(tmp_path)]) == 2
    assert "holds no readable images" in capsys.readouterr().err      # no --resolution: read from images
    assert not run.exists()


# ----------------------------------------------------------------------------------------------
# The held-out split (test_images.npy: the 1-NN AUROC of cedm evaluate)

def test_digits_holds_out_every_10th_image_never_trained_on(tmp_path):
    from sklearn.datasets import load_digits

    run = tmp_path / "run"
    res = data.run(run, "digits", limit=100)
    rd = RunDir(run)
    x, y = np.load(rd.data / "images.npy"), np.load(rd.data / "labels.npy")
    xt, yt = np.load(rd.data / "test_images.npy"), np.load(rd.data / "test_labels.npy")
    assert x.shape == (100, 8, 8, 3) and xt.shape == (179, 8, 8, 3) and xt.dtype == np.uint8  # --limit: train only
    sk = load_digits()
    index = np.arange(len(sk.target))
    held, train_idx = index[index % 10 == 9], index[index % 10 != 9]
    assert len(held) == 179 and len(train_idx) == 1618
    assert yt.tolist() == sk.target[held].tolist() and y.tolist() == sk.target[train_idx[:100]].tolist()
    full = data.load_digits(8, "all")["images"]                 # the same images, all 1797
    np.testing.assert_array_equal(xt, full[held])
    np.testing.assert_array_equal(x, full[train_idx[:100]])
    assert not set(held) & set(data.load_digits(8, "train")["source_index"].tolist())
    man = json.loads((rd.data / "manifest.json").read_text())
    assert man["num_test_images"] == 179 and man["config"]["heldout"] == "index % 10 == 9"
    assert man["outputs"]["test_images"] == "test_images.npy" and res["num_images"] == 100
    # Deterministic: a second preparation elsewhere is byte-identical.
    data.run(tmp_path / "again", "digits", limit=100)
    assert (RunDir(tmp_path / "again").data / "test_images.npy").read_bytes() == (rd.data / "test_images.npy").read_bytes()


def _hwc(rows):
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_cifar_train_split_writes_the_test_batch_whole(tmp_path):
    tgz = tmp_path / "c10.tar.gz"
    batches = fake_cifar(tgz)
    rd = RunDir(tmp_path / "run")
    data.run(rd.root, "cifar10", source=str(tgz), md5="skip", limit=3)
    assert np.load(rd.data / "images.npy").shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(np.load(rd.data / "test_images.npy"), _hwc(batches["test_batch"][b"data"]))
    assert np.load(rd.data / "test_labels.npy").tolist() == batches["test_batch"][b"labels"]
    man = json.loads((rd.data / "manifest.json").read_text())
    assert man["num_test_images"] == 4 and man["config"]["heldout"] == "test batch"
    # Resized like the training images; CIFAR-100 keeps the coarse test labels too.
    tgz100 = tmp_path / "c100.tar.gz"
    b100 = fake_cifar(tgz100, "cifar100")
    rd100 = RunDir(tmp_path / "run100")
    data.run(rd100.root, "cifar100", source=str(tgz100), md5="skip", resolution=16)
    xt = np.load(rd100.data / "test_images.npy")
    assert xt.shape == (20, 16, 16, 3) and np.load(rd100.data / "images.npy").shape == (20, 16, 16, 3)
    np.testing.assert_array_equal(xt, data._resize_array(_hwc(b100["test"][b"data"]), 16))
    assert np.load(rd100.data / "test_labels.npy").tolist() == b100["test"][b"fine_labels"]
    assert np.load(rd100.data / "test_coarse_labels.npy").tolist() == b100["test"][b"coarse_labels"]
    # --split test prepares the test batch as the training set: nothing is held out then.
    rdt = RunDir(tmp_path / "test")
    data.run(rdt.root, "cifar10", source=str(tgz), md5="skip", split="test")
    assert not (rdt.data / "test_images.npy").exists()
    man = json.loads((rdt.data / "manifest.json").read_text())
    assert man["num_test_images"] == 0 and man["config"]["heldout"] is None


def test_folder_with_test_source(tmp_path, capsys):
    src = tmp_path / "imgs"
    _images(src)
    (src / "z_broken.png").unlink()
    held = tmp_path / "held"
    held.mkdir()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(held / "a.png")
    Image.fromarray(np.full((30, 20), 160, np.uint8), "L").save(held / "b.png")
    zheld = tmp_path / "held.zip"
    with zipfile.ZipFile(zheld, "w") as zf:
        for p in sorted(held.iterdir()):
            zf.write(p, p.name)
    run = tmp_path / "run"
    argv = ["data", "--run-dir", str(run), "--dataset", "folder", "--source", str(src), "--resolution", "8",
            "--limit", "2"]
    assert cli.main(argv + ["--test-source", str(held)]) == 0
    rd = RunDir(run)
    xt = np.load(rd.data / "test_images.npy")
    assert xt.shape == (2, 8, 8, 3) and (xt[0] == 90).all() and (xt[1] == 160).all()   # whole, not --limit'ed
    assert np.load(rd.data / "images.npy").shape == (2, 8, 8, 3) and not (rd.data / "test_labels.npy").exists()
    man = json.loads((rd.data / "manifest.json").read_text())
    assert man["num_test_images"] == 2 and man["config"]["test_source"] == str(held)
    assert man["config"]["heldout"] == "test_source"
    # Another test source is another result; a zip is read like the folder.
    assert cli.main(argv + ["--test-source", str(zheld)]) == 2
    assert "test_source" in capsys.readouterr().err
    assert cli.main(argv + ["--test-source", str(zheld), "--force"]) == 0
    np.testing.assert_array_equal(np.load(rd.data / "test_images.npy"), xt)
    # Without --test-source: no held-out split, said in the manifest.
    data.run(tmp_path / "plain", "ffhq64", source=str(src), resolution=8)
    assert not (RunDir(tmp_path / "plain").data / "test_images.npy").exists()
    man = json.loads((RunDir(tmp_path / "plain").data / "manifest.json").read_text())
    assert man["num_test_images"] == 0 and man["config"]["heldout"] is None and man["config"]["test_source"] is None


def test_a_bad_test_source_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "imgs"
    _images(src)
    run = tmp_path / "run"
    argv = ["data", "--run-dir", str(run), "--dataset", "folder", "--source", str(src), "--resolution", "8",
            "--skip-unreadable"]
    notzip = tmp_path / "held.txt"
    notzip.write_text("not a zip")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for bad, msg in ((tmp_path / "nope", "no such folder or file"), (notzip, "neither a folder nor a zip"),
                     (empty, "holds no images"), (broken, "no readable images")):
        assert cli.main(argv + ["--test-source", str(bad)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
        assert len(err) == 1 and "--test-source" in err[0] and msg in err[0], err
        assert not run.exists()
    # An unreadable held-out file is an error naming it unless --skip-unreadable.
    assert cli.main(argv[:-1] + ["--test-source", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "x.png" in err and "--test-source" in err and len(err.splitlines()) == 1 and not run.exists()
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "digits", "--test-source", str(src)]) == 2
    assert "folder, ffhq64 and afhqv2-64 only" in capsys.readouterr().err and not run.exists()


def _edm_zip(path, n=6, labels=True):
    """A dataset as NVlabs/edm's dataset_tool.py writes it: PNGs in 00000/, dataset.json."""
    rng = np.random.default_rng(0)
    names = [f"00000/img{i:08d}.png" for i in range(n)]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in names:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
            zf.writestr(name, buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [[nm, i % 3] for i, nm in enumerate(names)]
                                                if labels else None}))
    return names


def test_an_edm_dataset_zip_brings_its_labels(tmp_path):
    from cedm.conditioning import label_tags

    _edm_zip(tmp_path / "edm.zip")
    data.run(tmp_path / "run", "folder", source=str(tmp_path / "edm.zip"), resolution=8)
    labels = np.load(tmp_path / "run" / "data" / "labels.npy")
    assert labels.tolist() == [i % 3 for i in range(6)]
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert "labels_from" in json.dumps(manifest) and label_tags(tmp_path / "run") == ["labels"]
    # null labels (an unlabelled EDM dataset): images only
    _edm_zip(tmp_path / "unlabelled.zip", labels=False)
    data.run(tmp_path / "run2", "folder", source=str(tmp_path / "unlabelled.zip"), resolution=8)
    assert not (tmp_path / "run2" / "data" / "labels.npy").exists()


def test_a_bad_edm_dataset_json_is_a_one_line_error(tmp_path, capsys):
    names = _edm_zip(tmp_path / "edm.zip")
    with zipfile.ZipFile(tmp_path / "edm.zip", "a") as zf:    # an image dataset.json does not label
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
        zf.writestr("00001/img00000006.png", buf.getvalue())
    rc = cli.main(["data", "--run-dir", str(tmp_path / "run"), "--dataset", "folder", "--source",
                   str(tmp_path / "edm.zip"), "--resolution", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "no label for 1 image(s), e.g. 00001/img00000006.png" in err
    assert not (tmp_path / "run" / "data").exists()
    folder = tmp_path / "folder"
    (folder / "00000").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / names[0])
    (folder / "dataset.json").write_text('{"labels": [["00000/img00000000.png", "cat"]]}')
    rc = cli.main(["data", "--run-dir", str(tmp_path / "run"), "--dataset", "folder", "--source", str(folder),
                   "--resolution", "8"])
    assert rc == 2 and "[file name, integer class]" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# images.npy written block by block (docs/performance.md#data-memory)

def _varied_pngs(folder, n=23, broken_at=None, seed=1):
    """n PNGs of different sizes and modes (some resized, some cropped); one broken file at index
    `broken_at` (it sorts in the middle)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i == broken_at:
            (folder / f"{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
            continue
        h, w = int(rng.integers(12, 30)), int(rng.integers(12, 30))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        (img.convert("L") if i % 5 == 3 else img).save(folder / f"{i:03d}.png")
    return folder


def _reference_npy(folder, res, path):
    """The old path, restated: every image decoded into one in-memory array, saved with np.save."""
    imgs = []
    for p in sorted(folder.glob("*.png")):
        try:
            with Image.open(p) as im:
                im.load()
                imgs.append(data._resize_crop(im, res))
        except OSError:
            continue
    np.save(path, np.stack(imgs), allow_pickle=False)
    return path.read_bytes()


@pytest.mark.parametrize("broken", [None, 11])
def test_blockwise_images_npy_is_byte_identical_to_the_in_memory_path(tmp_path, monkeypatch, broken):
    from cedm.io import NpyRows, save_array

    src = _varied_pngs(tmp_path / "imgs", broken_at=broken)
    test_src = _varied_pngs(tmp_path / "held", n=7, seed=2)
    monkeypatch.setattr(data, "CHUNK_BYTES", 5 * 16 * 16 * 3)          # blocks of 5 rows: 4 full + a partial
    writes = []
    orig = NpyRows.write
    monkeypatch.setattr(NpyRows, "write", lambda self, block: (writes.append(len(block)), orig(self, block))[1])
    res = data.run(tmp_path / "run", "folder", source=str(src), resolution=16, skip_unreadable=broken is not None,
                   test_source=str(test_src))
    n = 23 - (broken is not None)
    assert res["num_images"] == n and sum(writes) == n + 7 and max(writes) == 5    # really block by block
    got = (RunDir(tmp_path / "run").data / "images.npy").read_bytes()
    assert got == _reference_npy(src, 16, tmp_path / "ref.npy")
    # ... and the same bytes as the in-memory load_folder saved by save_array
    save_array(tmp_path / "mem.npy", data.load_folder(src, 16, skip_unreadable=True)["images"])
    assert got == (tmp_path / "mem.npy").read_bytes()
    assert (RunDir(tmp_path / "run").data / "test_images.npy").read_bytes() == \
        _reference_npy(test_src, 16, tmp_path / "ref_test.npy")


def test_a_corrupt_image_midway_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    from cedm.io import NpyRows

    good, bad = _varied_pngs(tmp_path / "good"), _varied_pngs(tmp_path / "bad", broken_at=11)
    monkeypatch.setattr(data, "CHUNK_BYTES", 4 * 16 * 16 * 3)
    written = []
    orig = NpyRows.write
    monkeypatch.setattr(NpyRows, "write", lambda self, block: (written.append(len(block)), orig(self, block))[1])
    run = tmp_path / "run"
    argv = ["data", "--run-dir", str(run), "--dataset", "folder", "--resolution", "16", "--source"]

    # A fresh run: the error, and no data folder, no temporary file anywhere in the run dir.
    assert cli.main(argv + [str(bad)]) == 2
    err = capsys.readouterr().err
    assert "011.png" in err and "--skip-unreadable" in err and len(err.strip().splitlines()) == 1
    assert sum(written) >= 8                                   # blocks were written before it failed
    assert not (run / "data").exists() and not (run.exists() and any(run.rglob("*")))

    # A good result, then a failing --force redo: the previous result stays, byte for byte.
    assert cli.main(argv + [str(good)]) == 0
    before = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    written.clear()
    assert cli.main(argv + [str(bad), "--force"]) == 2
    assert "011.png" in capsys.readouterr().err and sum(written) >= 8
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == ["data"]     # no staging folder or *.tmp left


def test_folder_takes_its_resolution_from_the_images_when_they_agree(tmp_path, capsys):
    """An EDM dataset_tool.py zip has one square size by construction: --resolution may be left
    out (and is said); images of several sizes, or not square, need it (a one-line error)."""
    _edm_zip(tmp_path / "edm.zip")                                      # 6 PNGs, all 8x8
    run = tmp_path / "run"
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "folder", "--source", str(tmp_path / "edm.zip")]) == 0
    assert "resolution 8 from the images (all 8x8" in capsys.readouterr().err
    assert np.load(run / "data" / "images.npy").shape == (6, 8, 8, 3)
    assert json.loads((run / "data" / "manifest.json").read_text())["config"]["resolution"] == 8
    for name, sizes, match in (("mixed", [(8, 8), (8, 8), (16, 16)], "differ in size"),
                               ("wide", [(12, 8), (12, 8)], "12x8, not square")):
        folder = tmp_path / name
        folder.mkdir()
        for i, size in enumerate(sizes):
            Image.new("RGB", size).save(folder / f"{i}.png")
        assert cli.main(["data", "--run-dir", str(tmp_path / f"r-{name}"), "--dataset", "folder",
                         "--source", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "--resolution N" in err and len(err.splitlines()) == 1
        assert not (tmp_path / f"r-{name}").exists()
        assert cli.main(["data", "--run-dir", str(tmp_path / f"r-{name}"), "--dataset", "folder",
                         "--source", str(folder), "--resolution", "8"]) == 0
        capsys.readouterr()


def test_a_rerun_reuses_the_resolution_read_from_an_unchanged_source(tmp_path, capsys, monkeypatch):
    """The data stage's identity is its config (the source's path, not its bytes), and a folder's
    resolution is part of it: a rerun read every image header again before it could skip (70k for
    FFHQ, on every sweep rerun and Argo data step). Now the finished result's resolution is reused
    while the source's stamp (zip: size, mtime, fingerprint; folder: names, sizes, mtimes) is the
    one recorded; a changed source is read again, and images of another size are refused as before."""
    zpath = tmp_path / "edm.zip"
    _edm_zip(zpath)                                                      # 6 PNGs, 8x8
    run = tmp_path / "run"
    argv = ["data", "--run-dir", str(run), "--dataset", "folder", "--source", str(zpath)]
    assert cli.main(argv) == 0
    man = json.loads((run / "data" / "manifest.json").read_text())
    assert man["config"]["resolution"] == 8 and man[data.RESOLUTION_FROM] == {"images": data.source_stamp(zpath)}
    capsys.readouterr()
    read = []
    real = data.folder_resolution
    monkeypatch.setattr(data, "folder_resolution", lambda *a, **kw: read.append(a) or real(*a, **kw))
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert read == [] and "resolution 8 as the finished result read it" in err and "up to date" in err
    assert cli.main(argv + ["--limit", "3", "--force"]) == 0                  # another config: read again
    assert len(read) == 1
    capsys.readouterr()

    # The zip replaced by one of 16x16 images: read again, and the new size is another config (refused).
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            zf.writestr(f"00000/img{i:08d}.png", buf.getvalue())
    assert cli.main(argv + ["--limit", "3"]) == 2 and len(read) == 2
    assert "resolution" in capsys.readouterr().err

    # A folder source: one image more (same size) is read again, then reused.
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    fargv = ["data", "--run-dir", str(tmp_path / "frun"), "--dataset", "folder", "--source", str(folder)]
    assert cli.main(fargv) == 0 and len(read) == 3
    stamp = data.source_stamp(folder)
    Image.new("RGB", (8, 8)).save(folder / "3.png")
    assert data.source_stamp(folder) != stamp
    assert cli.main(fargv) == 0 and len(read) == 4             # read again: 8, same config, skipped
    # the skip keeps the first run's record (the stage's identity is the source's path, not its
    # bytes), so the headers are read on every rerun until a redo records the new stamp
    assert cli.main(fargv) == 0 and len(read) == 5
    assert cli.main(fargv + ["--force"]) == 0 and len(read) == 6
    assert cli.main(fargv) == 0 and len(read) == 6
    # a resolution the user gave is not the images' own: never reused for a run without it
    assert cli.main(["data", "--run-dir", str(tmp_path / "grun"), "--dataset", "folder", "--source", str(folder),
                     "--resolution", "8"]) == 0
    assert data.RESOLUTION_FROM not in json.loads((tmp_path / "grun" / "data" / "manifest.json").read_text())
    assert cli.main(["data", "--run-dir", str(tmp_path / "grun"), "--dataset", "folder", "--source", str(folder)]) == 0
    assert len(read) == 7
