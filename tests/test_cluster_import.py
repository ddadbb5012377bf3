"""`cedm cluster --import DIR`: the official C-EDM clusterings as they are (HHU-MMBS/cedm-official-wavc2025,
cluster_ids/<dataset>/<method>/clusters_<C>/beta-<gamma>/) as a cluster folder that `cedm train` trains on
(docs/method.md#cluster-import).

The files are written here exactly as the official ones are: cluster_ids.pt a 1-d int64 (or int32)
tensor, freq.pt = torch.unique(ids, return_counts=True)[1] (int64, one count per USED id, ascending;
read off all 133 official files). The label mapping and q(c) the import must give are the official
training's and sampler's: training/dataset.py `_read_pseudo_labels` (torch.unique(ids,
return_inverse=True), ids -> 0..C^u-1) and generate.py `get_labels` (multinomial(freq.float()),
asserting label_dim == len(freq)), restated below."""
import json
import pickle

import numpy as np
import pytest
import torch

from cedm import cli, cluster_import, train
from cedm.io import CedmError, RunDir, save_array, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(network="tiny", batch_size=8, lr=2e-3, lr_ramp_mimg=0.0001, progress=False)   # as test_train
N, C = 40, 6


def make_data(root, n=N, res=16, labels=True):
    """A prepared dataset only (data/ with its manifest): no features, no clustering."""
    rd = RunDir(root)
    rng = np.random.default_rng(0)
    save_array(rd.data / "images.npy", rng.integers(0, 255, size=(n, res, res, 3)).astype(np.uint8))
    if labels:
        save_array(rd.data / "labels.npy", np.arange(n, dtype=np.int64) % 3)
    write_manifest(rd.data, "data", {"dataset": "digits", "resolution": res, "num_classes": 10})
    return rd


def official_ids(n=N, used=(0, 1, 3, 5), dtype=torch.int64):
    """Ids as the official files hold them: clusters 2 and 4 empty (C^u = 4 of C = 6)."""
    return torch.tensor([used[i % len(used)] for i in range(n)], dtype=dtype)


def official_freq(ids):
    """freq.pt exactly as the official files hold it (int64 counts of the used ids, ascending)."""
    return torch.unique(torch.as_tensor(ids), return_counts=True)[1]


def write_files(d, ids, freq=None):
    d.mkdir(parents=True, exist_ok=True)
    torch.save(ids, d / "cluster_ids.pt")
    torch.save(official_freq(ids) if freq is None else freq, d / "freq.pt")
    return d


def official_training_labels(ids):
    """training/dataset.py, Dataset._read_pseudo_labels: ids -> 0..C^u-1 by torch.unique's inverse."""
    unique_ids, inverse_indices = torch.unique(torch.as_tensor(ids), return_inverse=True)
    return torch.arange(len(unique_ids))[inverse_indices]


def cedm(*argv):
    return cli.main(["cluster", *argv])


def test_import_writes_a_cluster_folder_and_train_maps_labels_as_the_official_training(tmp_path, capsys):
    run, src = tmp_path / "run", write_files(tmp_path / "official", official_ids())
    make_data(run)
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", str(C)) == 0
    out = run / "cluster/temi-C6"
    np.testing.assert_array_equal(np.load(out / "assignments.npy"), official_ids().numpy())
    assert np.load(out / "assignments.npy").dtype == np.int64
    s = json.loads((out / "summary.json").read_text())
    assert s["used_clusters"] == 4 and s["r_c"] == pytest.approx(4 / 6) and s["clusters"] == 6
    np.testing.assert_allclose(s["q"], [0.25, 0.25, 0, 0.25, 0, 0.25])
    assert s["imported"] is True and "anmi" in s                # labels exist: scored like `cedm cluster`
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "cluster" and man["config"]["method"] == "temi" and man["config"]["clusters"] == 6
    assert man["config"]["cluster_ids_sha256"] == cluster_import.file_hash(src / "cluster_ids.pt")
    assert man["config"]["freq_sha256"] == cluster_import.file_hash(src / "freq.pt")
    assert "data" in man["inputs"]
    assert "imported temi C=6" in capsys.readouterr().err

    meta = train.run(run, "temi-C6", mimg=24e-6, **SMALL)                # 3 steps of the tiny network
    # label_dim = len(freq) (generate.py's assert); each image's label = the official training's
    freq = official_freq(official_ids())
    assert meta["label_dim"] == len(freq) == 4 and meta["raw_labels"] == [0, 1, 3, 5]
    index = np.array([meta["label_map"][str(int(r))] for r in official_ids()])
    np.testing.assert_array_equal(index, official_training_labels(official_ids()).numpy())
    # labels at sampling: multinomial(freq.float()) draws label i with probability freq[i] / sum(freq)
    np.testing.assert_allclose(meta["q"], (freq.double() / freq.sum()).numpy())
    assert (run / "train/temi-C6/network.safetensors").exists()
    tman = json.loads((run / "train/temi-C6/manifest.json").read_text())
    assert "cluster/temi-C6" in tman["inputs"]

    # The same files again: reused. A changed file: refused (another import), until --force.
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", "6") == 0
    assert "same import); reused" in capsys.readouterr().err
    write_files(src, official_ids(used=(0, 1, 2, 3, 4, 5)))
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", "6") == 2
    err = capsys.readouterr().err
    assert "cluster_ids_sha256" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "summary.json").read_text())["used_clusters"] == 4      # kept as it was
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", "6",
                "--force") == 0
    assert json.loads((out / "summary.json").read_text())["used_clusters"] == 6
    # ... and the model trained on the old import is not reused: 6 labels now (another network)
    with pytest.raises(CedmError, match="network_kwargs"):
        train.run(run, "temi-C6", mimg=24e-6, **SMALL)
    meta = train.run(run, "temi-C6", mimg=24e-6, force=True, **SMALL)
    assert meta["label_dim"] == 6


def test_a_sparse_official_clustering_ids_up_to_c_minus_1_counts_of_length_cu(tmp_path):
    """As FFHQ's clusters_350: 348 counts, largest id 349 (here C = 12: 9 used, the largest 11),
    int32 ids as the official k-means files; the mapping is torch.unique's inverse."""
    run = tmp_path / "run"
    make_data(run, n=60)
    rng = np.random.default_rng(3)
    used = np.array([0, 2, 3, 5, 6, 7, 9, 10, 11])
    ids = torch.from_numpy(used[rng.integers(0, len(used), 60)].astype(np.int32))
    ids[:9] = torch.from_numpy(used.astype(np.int32))                    # every one of them used
    src = write_files(tmp_path / "clusters_12" / "beta-0.6", ids)
    assert torch.load(src / "freq.pt").dtype == torch.int64 and len(torch.load(src / "freq.pt")) == 9
    s = cluster_import.run(run, src, "kmeans", 12)
    assert s["used_clusters"] == 9 and s["r_c"] == 0.75
    from cedm.conditioning import conditioning

    cond = conditioning(run, "kmeans-C12", 60)
    np.testing.assert_array_equal(cond["index"], official_training_labels(ids).numpy())
    freq = official_freq(ids)
    np.testing.assert_allclose(cond["q"], (freq.double() / freq.sum()).numpy())
    assert cond["label_dim"] == len(freq)


def test_import_accepts_a_list_of_ids(tmp_path):
    run = tmp_path / "run"
    make_data(run, labels=False)
    ids = [i % 3 for i in range(N)]
    src = write_files(tmp_path / "o", ids, freq=official_freq(ids))
    s = cluster_import.run(run, src, "kmeans", 4)
    assert s["used_clusters"] == 3 and s["r_c"] == 0.75 and "anmi" not in s
    assert (run / "cluster/kmeans-C4/manifest.json").exists()


def test_beta_1_imports_as_the_gamma1_ablation_and_clip_labels_as_clip(tmp_path, capsys):
    """The official beta-1 folders are TEMI at gamma = 1 (Table 5): cluster/temi-C<C>@gamma1, beside
    the gamma = 0.6 one; the official CLIP pseudo-labels import as clip-C<C> and train."""
    run = tmp_path / "run"
    make_data(run)
    src = write_files(tmp_path / "beta-1", official_ids(used=(0, 5)))
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", "6",
                "--ablation", "gamma1") == 0
    s = json.loads((run / "cluster/temi-C6@gamma1/summary.json").read_text())
    assert s["ablation"] == "gamma1" and s["gamma"] == 1.0 and s["used_clusters"] == 2
    assert not (run / "cluster/temi-C6").exists()
    clip = write_files(tmp_path / "CLIP_pseudo_labels" / "20", official_ids(used=(0, 1, 2)))
    assert cedm("--run-dir", str(run), "--import", str(clip), "--method", "clip", "--clusters", "3") == 0
    assert train.run(run, "clip-C3", mimg=8e-6, **SMALL)["label_dim"] == 3
    capsys.readouterr()
    assert cedm("--run-dir", str(run), "--method", "clip", "--clusters", "3") == 2
    assert "add --import DIR" in capsys.readouterr().err


def _expect(tmp_path, capsys, ids, freq=None, clusters=C, match="", n=N, files=None):
    run = tmp_path / "run"
    make_data(run, n=n)
    src = tmp_path / "official"
    if files is None:
        write_files(src, ids, freq)
    else:
        files(src)
    rc = cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", str(clusters))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("cedm cluster: error: --import"), err
    assert match in err, err
    assert not (run / "cluster").exists() or not any((run / "cluster").iterdir())   # nothing half-written
    return err


def test_missing_file(tmp_path, capsys):
    def files(d):
        d.mkdir()
        torch.save(official_ids(), d / "cluster_ids.pt")
    err = _expect(tmp_path, capsys, None, files=files, match="missing")
    assert "freq.pt" in err


def test_missing_folder(tmp_path, capsys):
    _expect(tmp_path, capsys, None, files=lambda d: None, match="no such folder")


def test_not_a_tensor(tmp_path, capsys):
    def files(d):
        write_files(d, official_ids())
        torch.save({"ids": official_ids()}, d / "cluster_ids.pt")
    _expect(tmp_path, capsys, None, files=files, match="holds a dict, not a tensor")


def test_freq_not_a_tensor(tmp_path, capsys):
    def files(d):
        write_files(d, official_ids())
        torch.save([10, 10, 10, 10], d / "freq.pt")
    _expect(tmp_path, capsys, None, files=files, match="not a tensor of cluster counts")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_object_is_refused_without_running_it(tmp_path, capsys):
    def files(d):
        write_files(d, official_ids())
        with open(d / "cluster_ids.pt", "wb") as f:
            pickle.dump(_Evil(), f, protocol=2)
    run = tmp_path / "run"
    make_data(run)
    files(tmp_path / "official")
    assert cedm("--run-dir", str(run), "--import", str(tmp_path / "official"), "--method", "temi",
                "--clusters", str(C)) == 2
    out = capsys.readouterr()
    assert "weights_only=True" in out.err and "pwned" not in out.out


def test_corrupt_file(tmp_path, capsys):
    def files(d):
        write_files(d, official_ids())
        (d / "freq.pt").write_bytes((d / "freq.pt").read_bytes()[:20])
    _expect(tmp_path, capsys, None, files=files, match="cannot read")


def test_float_ids(tmp_path, capsys):
    _expect(tmp_path, capsys, official_ids().float(), freq=official_freq(official_ids()), match="must be integers")


def test_2d_ids(tmp_path, capsys):
    _expect(tmp_path, capsys, official_ids().reshape(N // 2, 2), freq=official_freq(official_ids()),
            match="must be 1-d")


def test_a_float_q_is_not_the_official_freq(tmp_path, capsys):
    """The format cedm expected before (q(c) as floats, length C) is refused, naming the real one."""
    q = torch.bincount(official_ids(), minlength=C).float() / N
    err = _expect(tmp_path, capsys, official_ids(), freq=q, match="integer image counts")
    assert "torch.unique(ids, return_counts=True)[1]" in err


def test_count_mismatch_names_both_numbers(tmp_path, capsys):
    err = _expect(tmp_path, capsys, official_ids(n=N - 1), n=N, match="holds 39 cluster ids")
    assert "has 40 images" in err


def test_negative_id(tmp_path, capsys):
    ids = official_ids()
    ids[7] = -1
    _expect(tmp_path, capsys, ids, match="negative cluster id (-1)")


def test_clusters_below_largest_id(tmp_path, capsys):
    _expect(tmp_path, capsys, official_ids(used=(0, 1, 7)), clusters=4,
            match="C must be at least 8, but --clusters is 4")


def test_counts_of_length_c_instead_of_cu(tmp_path, capsys):
    ids = official_ids()                                          # C^u = 4 of C = 6
    err = _expect(tmp_path, capsys, ids, freq=torch.bincount(ids, minlength=C), match="has 6 entries")
    assert "C^u = 4" in err


def test_counts_disagree_with_the_ids(tmp_path, capsys):
    freq = official_freq(official_ids())
    freq[2] += 1
    err = _expect(tmp_path, capsys, official_ids(), freq=freq, match="disagrees with the ids")
    assert "entry 2 (cluster id 3) is 11 but 10 images" in err


def test_clustering_flags_are_refused_with_import(tmp_path, capsys):
    run, src = tmp_path / "run", write_files(tmp_path / "o", official_ids())
    make_data(run)
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", "6",
                "--epochs", "3") == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi") == 2
    assert "needs --clusters" in capsys.readouterr().err
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "kmeans", "--clusters", "6",
                "--ablation", "gamma1") == 2
    assert "TEMI ablation" in capsys.readouterr().err


def test_import_without_prepared_data(tmp_path):
    src = write_files(tmp_path / "o", official_ids())
    with pytest.raises(CedmError, match="run the stage that makes it first"):
        cluster_import.run(tmp_path / "run", src, "temi", C)


def test_help_documents_import(capsys):
    with pytest.raises(SystemExit):
        cli.main(["cluster", "--help"])
    out = capsys.readouterr().out
    assert "--import DIR" in out and "cluster_ids.pt" in out and "return_counts=True)[1]" in out


def test_the_bound_names_an_imported_clustering_in_its_range(tmp_path):
    from cedm import bound

    run, src = tmp_path / "run", write_files(tmp_path / "official", official_ids())
    rd = make_data(run)
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", str(C)) == 0
    with pytest.raises(CedmError, match="imported clustering .* --from-existing"):
        bound.finished(rd, 2, 10)
    assert bound.finished(rd, 7, 10) == {}                      # outside the probed range: not in the way


def test_official_ids_index_the_images_cedm_data_prepares(tmp_path):
    """The official ids are in dataset order: CIFAR, the tarball's data_batch_1..5 rows in turn (EDM
    dataset_tool.py open_cifar10, as torchvision's CIFAR10 which TEMI's embeddings read); an EDM
    dataset zip (FFHQ), its image names sorted (EDM training/dataset.py ImageFolderDataset:
    sorted(fname ...)). `cedm data` prepares both in that order: ids made from the labels in the
    official order import with ACC 1, and id i is the image of sorted name i."""
    import zipfile

    from test_data import _edm_zip, fake_cifar

    tgz = tmp_path / "cifar-10-python.tar.gz"
    batches = fake_cifar(tgz, per_batch=6)
    run = tmp_path / "cifar"
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "cifar10", "--source", str(tgz), "--md5", "skip"]) == 0
    # dataset_tool.py open_cifar10: images / labels of data_batch_1..5 concatenated, CHW rows -> HWC
    rows = np.concatenate([batches[f"data_batch_{b}"][b"data"] for b in range(1, 6)])
    np.testing.assert_array_equal(np.load(run / "data/images.npy"), rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = torch.tensor(sum((batches[f"data_batch_{b}"][b"labels"] for b in range(1, 6)), []))
    s = cluster_import.run(run, write_files(tmp_path / "c10", labels), "temi", 10)
    assert s["acc"] == 1.0 and s["nmi"] == pytest.approx(1.0)

    names = _edm_zip(tmp_path / "edm.zip", n=12)
    shuffled = tmp_path / "shuffled.zip"                              # stored out of order in the zip
    with zipfile.ZipFile(tmp_path / "edm.zip") as src, zipfile.ZipFile(shuffled, "w") as dst:
        for name in reversed(src.namelist()):
            dst.writestr(name, src.read(name))
    run = tmp_path / "ffhq"
    assert cli.main(["data", "--run-dir", str(run), "--dataset", "folder", "--source", str(shuffled)]) == 0
    from PIL import Image

    with zipfile.ZipFile(shuffled) as z:
        want = np.stack([np.asarray(Image.open(z.open(n))) for n in sorted(names)])
    np.testing.assert_array_equal(np.load(run / "data/images.npy"), want)
