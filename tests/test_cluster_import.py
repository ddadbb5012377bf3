"""`cedm cluster --import DIR`: the official C-EDM cluster_ids.pt + freq.pt as a cluster folder
that `cedm train` trains on (docs/method.md#cluster-import)."""
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


def official_ids(n=N, used=(0, 1, 3, 5)):
    """Ids as the official files hold them: clusters 2 and 4 empty (C^u = 4 of C = 6)."""
    return torch.tensor([used[i % len(used)] for i in range(n)], dtype=torch.int64)


def write_files(d, ids, freq=None, clusters=C):
    d.mkdir(parents=True, exist_ok=True)
    if freq is None:
        freq = torch.bincount(torch.as_tensor(ids), minlength=clusters).float() / len(ids)
    torch.save(ids, d / "cluster_ids.pt")
    torch.save(freq, d / "freq.pt")
    return d


def cedm(*argv):
    return cli.main(["cluster", *argv])


def test_import_writes_a_cluster_folder_and_train_uses_it(tmp_path, capsys):
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
    assert meta["label_dim"] == 4 and meta["raw_labels"] == [0, 1, 3, 5]
    np.testing.assert_allclose(meta["q"], [0.25] * 4)
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


def test_import_accepts_a_list_of_ids_and_kmeans(tmp_path):
    run = tmp_path / "run"
    make_data(run, labels=False)
    ids = [i % 3 for i in range(N)]
    src = write_files(tmp_path / "o", ids, freq=torch.bincount(torch.tensor(ids), minlength=4).double() / N,
                      clusters=4)
    s = cluster_import.run(run, src, "kmeans", 4)
    assert s["used_clusters"] == 3 and s["r_c"] == 0.75 and "anmi" not in s
    assert (run / "cluster/kmeans-C4/manifest.json").exists()


def _expect(tmp_path, capsys, ids, freq=None, clusters=C, match="", n=N, files=None):
    run = tmp_path / "run"
    make_data(run, n=n)
    src = tmp_path / "official"
    if files is None:
        write_files(src, ids, freq, clusters)
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
        torch.save([0.25] * 6, d / "freq.pt")
    _expect(tmp_path, capsys, None, files=files, match="not a tensor of frequencies")


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
    _expect(tmp_path, capsys, official_ids().float(), freq=torch.full((C,), 1 / C), match="must be integers")


def test_2d_ids(tmp_path, capsys):
    _expect(tmp_path, capsys, official_ids().reshape(N // 2, 2), freq=torch.full((C,), 1 / C),
            match="must be 1-d")


def test_integer_freq(tmp_path, capsys):
    _expect(tmp_path, capsys, official_ids(), freq=torch.ones(C, dtype=torch.int64), match="floating point")


def test_count_mismatch_names_both_numbers(tmp_path, capsys):
    err = _expect(tmp_path, capsys, official_ids(n=N - 1), n=N, match="holds 39 cluster ids")
    assert "has 40 images" in err


def test_negative_id(tmp_path, capsys):
    ids = official_ids()
    ids[7] = -1
    _expect(tmp_path, capsys, ids, freq=torch.full((C,), 1 / C), match="negative cluster id (-1)")


def test_clusters_below_largest_id(tmp_path, capsys):
    _expect(tmp_path, capsys, official_ids(used=(0, 1, 7)), freq=torch.full((4,), 0.25), clusters=4,
            match="C must be at least 8, but --clusters is 4")


def test_freq_wrong_length(tmp_path, capsys):
    ids = official_ids(used=(0, 1, 3))                          # freq over the ids 0..3 only, C = 6
    err = _expect(tmp_path, capsys, ids, freq=torch.bincount(ids).float() / N, match="freq length must be C")
    assert "has 4 entries" in err


def test_freq_disagrees_with_ids(tmp_path, capsys):
    _expect(tmp_path, capsys, official_ids(), freq=torch.full((C,), 1 / C), match="disagrees with the ids")


def test_freq_within_tolerance_is_accepted(tmp_path):
    run, ids = tmp_path / "run", official_ids()
    make_data(run)
    freq = torch.bincount(ids, minlength=C).double() / N + 0.5 * cluster_import.FREQ_ATOL
    s = cluster_import.run(run, write_files(tmp_path / "o", ids, freq), "temi", C)
    assert s["freq_max_abs_diff"] == pytest.approx(0.5 * cluster_import.FREQ_ATOL)
    np.testing.assert_allclose(s["q"], torch.bincount(ids, minlength=C).numpy() / N)   # q is the ids'


def test_clustering_flags_are_refused_with_import(tmp_path, capsys):
    run, src = tmp_path / "run", write_files(tmp_path / "o", official_ids())
    make_data(run)
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", "6",
                "--epochs", "3") == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi") == 2
    assert "needs --clusters" in capsys.readouterr().err


def test_import_without_prepared_data(tmp_path):
    src = write_files(tmp_path / "o", official_ids())
    with pytest.raises(CedmError, match="run the stage that makes it first"):
        cluster_import.run(tmp_path / "run", src, "temi", C)


def test_help_documents_import(capsys):
    with pytest.raises(SystemExit):
        cli.main(["cluster", "--help"])
    out = capsys.readouterr().out
    assert "--import DIR" in out and "cluster_ids.pt" in out and "freq.pt" in out


def test_the_bound_names_an_imported_clustering_in_its_range(tmp_path):
    from cedm import bound

    run, src = tmp_path / "run", write_files(tmp_path / "official", official_ids())
    rd = make_data(run)
    assert cedm("--run-dir", str(run), "--import", str(src), "--method", "temi", "--clusters", str(C)) == 0
    with pytest.raises(CedmError, match="imported clustering .* import into a run directory of its own"):
        bound.finished(rd, 2, 10)
    assert bound.finished(rd, 7, 10) == {}                      # outside the probed range: not in the way
