"""cedm.bound: the C_max search (doubling + bisection on r_C), its table, plot and errors (issue 3)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cedm import bound, cli, knn, telemetry
from cedm.io import CedmError, RunDir, save_array, write_manifest

K = 5
TEMI_FLAGS = ["--heads", "4", "--epochs", "100", "--batch-size", "64", "--lr", "1e-3",
              "--teacher-momentum", "0.99", "--hidden", "64", "--bottleneck", "32"]


pytestmark = pytest.mark.usefixtures("one_thread")


def blob_run(root, sizes=(90, 75, 60, 50, 40), dim=16, noise=0.01, seed=0):
    """K well-separated groups of unequal sizes on the unit sphere, as a run directory."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:len(sizes)]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    rd = RunDir(root)
    save_array(rd.data / "labels.npy", labels)
    write_manifest(rd.data, "data", {"dataset": "blobs", "resolution": 8, "num_classes": len(sizes)})
    save_array(rd.features / "features.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    write_manifest(rd.features, "features", {"backbone": "synthetic"})
    knn.run(rd.root, k=10)
    return rd


def test_search_doubles_then_bisects():
    calls = []

    def probe(c):
        calls.append(c)
        return 1.0 if c <= 37 else 0.5

    res = bound.search(probe, 5, 0.96, 1000)
    assert res["c_max"] == 37 and res["bounded"]
    assert calls[:4] == [5, 10, 20, 40]                     # doubling until r_C <= alpha
    assert all(20 <= c <= 40 for c in calls[4:])            # then bisection in (20, 40)
    assert len(calls) == len(set(calls)) <= 4 + math.ceil(math.log2(20))
    assert [r["clusters"] for r in res["rows"]] == sorted(calls)
    # a coarser bisection stops early but keeps the invariant r(c_max) > alpha
    res = bound.search(lambda c: 1.0 if c <= 37 else 0.5, 5, 0.96, 1000, tol=4)
    assert 33 <= res["c_max"] <= 37


def test_search_never_failing_gives_a_lower_bound_and_failing_start_is_an_error():
    res = bound.search(lambda c: 1.0, 3, 0.96, 50)
    assert res == {"c_max": 50, "bounded": False, "rows": [{"clusters": c, "r_c": 1.0} for c in (3, 6, 12, 24, 48, 50)]}
    with pytest.raises(CedmError, match="below C_start"):
        bound.search(lambda c: 0.9, 10, 0.96, 100)


def test_bound_on_blobs_finds_cmax_at_least_K(tmp_path, capsys):
    rd = blob_run(tmp_path / "run")
    argv = ["bound", "--run-dir", str(rd.root), "--c-start", str(K), "--max-clusters", "160"] + TEMI_FLAGS
    assert cli.main(argv) == 0
    table = json.loads((rd.bound / "table.json").read_text())
    rows = {r["clusters"]: r for r in table["rows"]}
    c_max = table["c_max"]
    assert c_max >= K and table["bounded"]
    assert rows[c_max]["r_c"] > 0.96 and rows[c_max + 1]["r_c"] <= 0.96     # the bracket is exact
    assert rows[K]["r_c"] > 0.96 and rows[K]["used_clusters"] == K
    assert all(r["r_c"] == r["used_clusters"] / c for c, r in rows.items())
    runs = table["temi_runs"]
    assert runs["total"] == len(rows) and runs["reused"] == []
    assert runs["total"] <= 2 * math.ceil(math.log2(160 / K)) + 1            # O(log) TEMI runs
    assert (rd.bound / "r_c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert telemetry.REGISTRY.get_sample_value("cedm_bound_cmax_clusters") == c_max
    assert capsys.readouterr().out.strip() == str(c_max)

    # the same search again is skipped; a fresh bound folder reuses every cluster run on disk
    assert bound.run(rd.root, c_start=K, max_clusters=160, **_flags())["skipped"]
    import shutil

    shutil.rmtree(rd.bound)
    again = bound.run(rd.root, c_start=K, max_clusters=160, progress=False, **_flags())
    assert again["c_max"] == c_max and again["temi_runs"]["computed"] == []
    assert sorted(again["temi_runs"]["reused"]) == sorted(rows)

    # starting above C_max: clear message, no table
    shutil.rmtree(rd.bound)
    first_fail = min(c for c, r in rows.items() if r["r_c"] <= 0.96)
    argv = ["bound", "--run-dir", str(rd.root), "--c-start", str(first_fail), "--max-clusters", "160"] + TEMI_FLAGS
    assert cli.main(argv) == 2
    assert "C_max is below C_start" in capsys.readouterr().err
    assert not rd.bound.exists()


def _flags():
    return dict(heads=4, epochs=100, batch_size=64, lr=1e-3, teacher_momentum=0.99, hidden=64, bottleneck=32)


def test_unbounded_search_says_lower_bound(tmp_path, monkeypatch, capsys):
    rd = blob_run(tmp_path / "run", sizes=(30, 30), dim=8)
    from cedm import cluster

    def fake(run_dir, method, c, **kw):                      # r_C = 1 everywhere
        return {"method": method, "clusters": c, "r_c": 1.0, "used_clusters": c, "reused": False}

    monkeypatch.setattr(cluster, "run", fake)
    assert cli.main(["bound", "--run-dir", str(rd.root), "--c-start", "4", "--max-clusters", "20"]) == 0
    table = json.loads((rd.bound / "table.json").read_text())
    assert table["c_max"] == 20 and not table["bounded"] and "lower bound" in table["note"]
    assert "lower bound" in capsys.readouterr().err


def test_bad_bound_arguments(tmp_path, capsys):
    rd = blob_run(tmp_path / "run", sizes=(30, 30), dim=8)
    for extra, needle in ((["--alpha", "1.5"], "--alpha"), (["--c-start", "1"], "at least 2"),
                          (["--c-start", "8", "--max-clusters", "4"], "exceeds --max-clusters"),
                          (["--max-clusters", "100"], "exceeds the number of samples")):
        assert cli.main(["bound", "--run-dir", str(rd.root)] + extra) == 2
        assert needle in capsys.readouterr().err
    assert not rd.bound.exists() and not (rd.root / "cluster").exists()
