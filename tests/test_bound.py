"""cedm.bound: the C_max search (doubling + bisection on r_C), its table, plot and errors (issue 3)."""
from __future__ import annotations

import itertools
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


def _check_postcondition(res, r, alpha=0.96, tol=1):
    """What the search guarantees, whatever the order of its probes (cedm/bound.py docstring)."""
    rows = {row["clusters"]: row["r_c"] for row in res["rows"]}
    assert all(rows[c] == r(c) for c in rows)
    c_max = res["c_max"]
    assert rows[c_max] > alpha                                     # C_max passes ...
    assert c_max == max(c for c, v in rows.items() if v > alpha)   # ... and is the largest probe that does
    above = [c for c in rows if c > c_max]
    if res["bounded"]:
        assert above and min(above) - c_max <= tol                 # a failing probe within tol above it
    else:
        assert not above


def test_doubling_climbs_four_rungs_a_round_then_grids_refine():
    r = lambda c: 1.0 if c <= 37 else 0.5
    step = bound.next_round({}, 5, 1000)
    assert step == {"done": False, "next": [5, 10, 20, 40], "c_max": None, "bounded": None}
    # the top rung 40 passes -> the next four rungs; it fails -> no more doubling
    assert bound.next_round({5: 1, 10: 1, 20: 1, 40: 1}, 5, 1000)["next"] == [80, 160, 320, 640]
    assert bound.next_round({5: 1, 10: 1, 20: 1, 40: 0.5}, 5, 1000)["next"] == bound.grid_points(20, 40)
    res = bound.search(r, 5, 0.96, 1000)
    assert res["c_max"] == 37 and res["bounded"]
    assert res["rounds"][0] == step["next"]
    assert all(20 < c < 40 for rnd in res["rounds"][1:] for c in rnd)          # grids inside (20, 40)
    assert all(len(rnd) <= bound.GRID for rnd in res["rounds"][1:])
    assert len(res["rounds"]) == 3                                   # 4 + 7 + 2 runs in 3 parallel rounds
    _check_postcondition(res, r)
    # a coarser tolerance stops earlier with the same guarantee
    res = bound.search(r, 5, 0.96, 1000, tol=4)
    assert 33 <= res["c_max"] <= 37
    _check_postcondition(res, r, tol=4)


def test_grid_points_cover_the_bracket():
    assert bound.grid_points(5, 10, 7) == [6, 7, 8, 9]                # few enough: every integer
    assert bound.grid_points(320, 640, 7) == [360, 400, 440, 480, 520, 560, 600]   # linear in one octave
    wide = bound.grid_points(10, 600, 7)                               # geometric over octaves
    assert len(wide) == 7 and all(10 < c < 600 for c in wide)
    ratios = [b / a for a, b in itertools.pairwise(wide)]
    assert max(ratios) / min(ratios) < 1.2
    assert bound.ladder(3, 50) == [3, 6, 12, 24, 48, 50] and bound.ladder(8, 8) == [8]


def test_non_monotone_r_c_never_ignores_a_pass_above_a_failure():
    # A dip on the ladder: r(20) fails but everything up to 40 passes. The first failure is not the
    # bound; a rule that stops at it ("last pass before the first failure") would give 19.
    r = lambda c: 0.95 if c == 20 else (1.0 if c <= 40 else 0.5)
    res = bound.search(r, 5, 0.96, 1000)
    assert res["c_max"] == 40
    assert {"clusters": 20, "r_c": 0.95} in res["rows"]
    _check_postcondition(res, r)

    # The measured shape near alpha: 0.969 at 96 and 0.995 at 192 (both pass), jagged crossings
    # (161 passes, 162 fails, 170 passes again), then failures for good.
    table = {96: 0.969, 192: 0.995, 161: 0.969, 162: 0.944, 170: 0.97}

    def jagged(c):
        if c in table:
            return table[c]
        return 0.99 if c < 150 else (0.97 if c < 200 else 0.93)

    res = bound.search(jagged, 12, 0.96, 3000, known={162: 0.944})
    _check_postcondition(res, jagged)
    assert res["c_max"] == 199                                         # the last crossing, not 161

    # Whatever clusterings were on disk before, the guarantee holds and the search is reproducible.
    for known in ({}, {160: jagged(160), 700: jagged(700)}, {c: jagged(c) for c in (100, 200, 400)}):
        a = bound.search(jagged, 12, 0.96, 3000, known=known)
        b = bound.search(jagged, 12, 0.96, 3000, known=known)
        assert a == b
        _check_postcondition(a, jagged)


def test_next_round_is_a_pure_plan_of_the_known_table():
    # a doubling round completes its four rungs; rungs on disk are reused, not planned again
    step = bound.next_round({10: 1.0, 20: 1.0, 50: 0.99, 600: 0.93, 800: 0.9}, 10, 1000)
    assert step["next"] == [40, 80] and not step["done"]
    # with the ladder done, the grid goes between the largest pass and the next probe above it
    ladder = {c: (0.97 if c <= 320 else 0.9) for c in bound.ladder(10, 1000)}
    step = bound.next_round({**ladder, 500: 0.99, 600: 0.93}, 10, 1000)
    assert step["next"] == bound.grid_points(500, 600)               # 500, a pass above 320, counts
    # clusterings outside [C_start, max_clusters] are not probes
    assert bound.next_round({4: 0.1, 10: 1.0, 11: 0.5, 20: 0.5, 5000: 1.0}, 10, 20)["c_max"] == 10
    # a failure below the top rung (a dip) does not stop the climb; only the top rung decides,
    # so a clustering on disk changes the cost, never the probe set
    assert bound.next_round({10: 1, 20: 0.9, 40: 1, 80: 1}, 10, 1000)["next"] == [160, 320, 640, 1000]
    assert bound.next_round({80: 0.9}, 10, 1000)["next"] == [10, 20, 40]
    # done: bounded, and unbounded when r_C > alpha up to max_clusters
    assert bound.next_round({10: 1.0, 11: 0.5, 20: 0.5}, 10, 20) == {"done": True, "next": [], "c_max": 10,
                                                                     "bounded": True}
    assert bound.next_round({10: 1.0, 20: 1.0, 25: 1.0}, 10, 25)["c_max"] == 25
    with pytest.raises(CedmError, match="below C_start"):
        bound.next_round({c: 0.9 for c in bound.ladder(10, 100)}, 10, 100)


def test_search_never_failing_gives_a_lower_bound_and_failing_start_is_an_error():
    res = bound.search(lambda c: 1.0, 3, 0.96, 50)
    assert res["c_max"] == 50 and res["bounded"] is False
    assert res["rows"] == [{"clusters": c, "r_c": 1.0} for c in (3, 6, 12, 24, 48, 50)]
    with pytest.raises(CedmError, match="below C_start"):
        bound.search(lambda c: 0.9, 10, 0.96, 100)


MAX_C = 80


@pytest.fixture(scope="module")
def blobs_bound(tmp_path_factory):
    """One real local `cedm bound` on the blobs (TEMI runs included), shared by the tests below:
    (run dir, its table as first written, what it printed)."""
    import contextlib
    import io

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rd = blob_run(tmp_path_factory.mktemp("blobs") / "run")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = cli.main(["bound", "--run-dir", str(rd.root), "--c-start", str(K), "--max-clusters", str(MAX_C)]
                          + TEMI_FLAGS)
        assert rc == 0
    finally:
        torch.set_num_threads(n)
    return rd, json.loads((rd.bound / "table.json").read_text()), out.getvalue()


def test_bound_on_blobs_finds_cmax_at_least_K(blobs_bound, capsys):
    rd, table, printed = blobs_bound
    rows = {r["clusters"]: r for r in table["rows"]}
    c_max = table["c_max"]
    assert c_max >= K and table["bounded"]
    assert rows[c_max]["r_c"] > 0.96 and rows[c_max + 1]["r_c"] <= 0.96     # the bracket is exact
    assert all(r["r_c"] <= 0.96 for c, r in rows.items() if c > c_max)      # every probe above fails
    assert rows[K]["r_c"] > 0.96 and rows[K]["used_clusters"] == K
    assert all(r["r_c"] == r["used_clusters"] / c for c, r in rows.items())
    runs = table["temi_runs"]
    assert runs["total"] == len(rows) and runs["reused"] == []
    assert table["rounds"][0] == bound.ladder(K, MAX_C)[:bound.RUNGS]            # four rungs at once
    doubling = math.ceil(len(bound.ladder(K, MAX_C)) / bound.RUNGS)
    assert len(table["rounds"]) <= doubling + math.ceil(math.log(MAX_C, bound.GRID + 1))  # few grid rounds
    assert (rd.bound / "r_c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert printed.strip() == str(c_max)

    # the same search again is skipped; a fresh bound folder reuses every cluster run on disk
    assert bound.run(rd.root, c_start=K, max_clusters=MAX_C, **_flags())["skipped"]
    assert telemetry.REGISTRY.get_sample_value("cedm_bound_cmax_clusters") == c_max
    import shutil

    saved = rd.root.parent / "bound.saved"
    shutil.copytree(rd.bound, saved)
    shutil.rmtree(rd.bound)
    again = bound.run(rd.root, c_start=K, max_clusters=MAX_C, progress=False, **_flags())
    assert again["c_max"] == c_max and again["temi_runs"]["computed"] == [] and again["rounds"] == []
    assert sorted(again["temi_runs"]["reused"]) == sorted(rows)

    # starting above C_max: clear message, no table
    shutil.rmtree(rd.bound)
    first_fail = c_max + 1
    argv = ["bound", "--run-dir", str(rd.root), "--c-start", str(first_fail), "--max-clusters", str(first_fail)]
    assert cli.main(argv + TEMI_FLAGS) == 2
    assert "C_max is below C_start" in capsys.readouterr().err
    assert not rd.bound.exists()
    shutil.copytree(saved, rd.bound)                                # as the fixture left it


def _flags():
    return {"heads": 4, "epochs": 100, "batch_size": 64, "lr": 1e-3, "teacher_momentum": 0.99, "hidden": 64,
            "bottleneck": 32}


def test_unbounded_search_says_lower_bound(tmp_path, monkeypatch, capsys):
    rd = blob_run(tmp_path / "run", sizes=(30, 30), dim=8)
    from cedm import cluster

    def fake(run_dir, method, c, **kw):                      # r_C = 1 everywhere
        write_manifest(rd.cluster(method, c), "cluster", {"clusters": c})   # a finished clustering
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


def _next(run, capsys, *extra) -> list[int]:
    assert cli.main(["bound", "--next", "--run-dir", str(run), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_round_by_round_next_reaches_the_local_c_max(blobs_bound, tmp_path, capsys):
    """The Argo path (`bound --next` -> cluster the round in parallel -> again until [] -> `bound`)
    plans the same rounds as a local `cedm bound` and ends with the same table, computing nothing
    in the last step. The round's "cluster pods" copy the local run's clusterings (TEMI is
    deterministic on CPU, tests/test_temi.py); the slow digits test computes them."""
    import shutil

    local, table, _ = blobs_bound
    extra = ["--c-start", str(K), "--max-clusters", str(MAX_C)]

    argo = RunDir(tmp_path / "argo")
    for stage in ("data", "features", "knn"):
        shutil.copytree(local.root / stage, argo.root / stage)
    rounds = []
    out = tmp_path / "outputs" / "next"
    while True:
        nxt = _next(argo.root, capsys, *extra, "--next-out", str(out))
        assert json.loads(out.read_text()) == nxt                   # the Argo output parameter
        if not nxt:
            break
        rounds.append(nxt)
        for c in nxt:                                               # the round's cluster pods
            shutil.copytree(local.cluster("temi", c), argo.cluster("temi", c))
    assert rounds == table["rounds"]
    assert not argo.bound.exists()                                  # --next writes nothing to the run
    c_max_file = tmp_path / "outputs" / "c-max"
    assert cli.main(["bound", "--run-dir", str(argo.root), *extra, "--c-max-out", str(c_max_file)] + TEMI_FLAGS) == 0
    again = json.loads((argo.bound / "table.json").read_text())
    assert c_max_file.read_text() == str(table["c_max"]) == capsys.readouterr().out.strip()
    assert again["temi_runs"]["computed"] == [] and again["rounds"] == []
    assert {k: again[k] for k in ("rows", "c_max", "bounded")} == {k: table[k] for k in ("rows", "c_max", "bounded")}

    # another clustering in range after the bound: the search is redone with it, never reused stale
    assert cli.main(["cluster", "--run-dir", str(argo.root), "--method", "temi", "--clusters", "3"] + TEMI_FLAGS) == 0
    assert cli.main(["bound", "--run-dir", str(argo.root), *extra] + TEMI_FLAGS) == 0   # C=3 < C_start: not a probe
    assert "up to date" in capsys.readouterr().err
    extra_c = max(c for c in range(table["c_max"], MAX_C) if c not in bound.finished(argo, K, MAX_C))
    assert cli.main(["cluster", "--run-dir", str(argo.root), "--method", "temi", "--clusters", str(extra_c)]
                    + TEMI_FLAGS) == 0
    capsys.readouterr()
    assert cli.main(["bound", "--run-dir", str(argo.root), *extra] + TEMI_FLAGS) == 0
    assert "changed since" in capsys.readouterr().err
    redone = json.loads((argo.bound / "table.json").read_text())
    assert extra_c in {row["clusters"] for row in redone["rows"]}
    assert redone["c_max"] == max(r["clusters"] for r in redone["rows"] if r["r_c"] > 0.96)


def test_next_errors_and_stale_clusterings(tmp_path, capsys, monkeypatch):
    rd = blob_run(tmp_path / "run", sizes=(30, 30), dim=8)
    assert _next(rd.root, capsys, "--c-start", "4", "--max-clusters", "20") == [4, 8, 16, 20]
    assert cli.main(["bound", "--run-dir", str(rd.root), "--next-out", str(tmp_path / "x")]) == 2
    assert "--next-out needs --next" in capsys.readouterr().err
    assert cli.main(["bound", "--next", "--run-dir", str(rd.root), "--grid", "0"]) == 2
    assert "--grid must be at least 1" in capsys.readouterr().err
    # a clustering made from other features is refused, not silently used as a probe
    from cedm import cluster

    cluster.run(rd.root, "temi", 4, progress=False, **_flags())
    capsys.readouterr()
    man = rd.cluster("temi", 4) / "manifest.json"
    m = json.loads(man.read_text())
    m["config"]["features"] = "0" * 64
    man.write_text(json.dumps(m))
    assert cli.main(["bound", "--next", "--run-dir", str(rd.root), "--c-start", "4", "--max-clusters", "20"]) == 2
    err = capsys.readouterr().err
    assert "temi-C4 was clustered from other features" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_digits_local_bound_and_argo_rounds_agree(tmp_path, capsys):
    """On the built-in digits: `cedm bound` locally, and the round-by-round path computing each
    round with `cedm cluster` as the Argo pods do, reach the same C_max and table. Short TEMI runs
    (10 epochs) put the crossing inside (40, 160), so the search refines in grid rounds."""
    temi = ["--epochs", "10"]
    common = ["--c-start", "40", "--max-clusters", "160", "--tol", "4", *temi]
    runs = {}
    for name in ("local", "argo"):
        run = tmp_path / name
        for argv in (["data", "--dataset", "digits"], ["features"], ["knn"]):
            assert cli.main([argv[0], "--run-dir", str(run), *argv[1:]]) == 0
        runs[name] = run
    assert cli.main(["bound", "--run-dir", str(runs["local"]), *common]) == 0
    local = json.loads((runs["local"] / "bound" / "table.json").read_text())
    assert local["bounded"] and len(local["rounds"]) >= 2               # the grid rounds did run
    capsys.readouterr()
    planned = []
    while nxt := _next(runs["argo"], capsys, *common):
        planned.append(nxt)
        for c in nxt:
            assert cli.main(["cluster", "--run-dir", str(runs["argo"]), "--method", "temi", "--clusters", str(c),
                             *temi]) == 0
        capsys.readouterr()
    assert planned == local["rounds"]
    assert cli.main(["bound", "--run-dir", str(runs["argo"]), *common]) == 0
    argo = json.loads((runs["argo"] / "bound" / "table.json").read_text())
    assert argo["temi_runs"]["computed"] == []
    assert (argo["c_max"], argo["bounded"], argo["rows"]) == (local["c_max"], local["bounded"], local["rows"])


# ----------------------------------------------------------------------------------------------
# `cedm bound --from-existing`: the table from clusterings already in the run (imported or trained)

# (C, C^u) of the official CIFAR-10 DINO ViT-B/16 TEMI clusterings at gamma = 0.6 (HHU-MMBS/
# cedm-official-wavc2025, cluster_ids/cifar10/TEMI-dino_vitb16/clusters_<C>/beta-0.6, read off the
# files: len(freq.pt); also the `uniq` column of its metrics.md), C = 5000 and 10000 left out here
# (they need N >= 10000 ids). The paper's C_max on that grid: 500 (r_C 0.98 at 500, 0.93 at 600).
OFFICIAL_CIFAR10 = {10: 10, 34: 34, 50: 50, 100: 100, 125: 125, 150: 148, 200: 199, 250: 249, 300: 295,
                    350: 343, 400: 391, 500: 490, 600: 558, 800: 741, 1000: 918}


def _import_grid(tmp_path, grid, n=1000):
    """A run with data only and, per C, an official-format clustering (ids 0..C^u-1 plus C - 1, so
    the largest id is C - 1 as in the official files) imported with `cedm cluster --import`."""
    from cedm import cluster_import

    rd = RunDir(tmp_path / "run")
    save_array(rd.data / "images.npy", np.zeros((n, 2, 2, 3), np.uint8))
    write_manifest(rd.data, "data", {"dataset": "folder", "resolution": 2})
    for c, used in grid.items():
        ids = torch.cat([torch.arange(used - 1), torch.full((n - used + 1,), c - 1)])
        d = tmp_path / "official" / f"clusters_{c}" / "beta-0.6"
        d.mkdir(parents=True)
        torch.save(ids, d / "cluster_ids.pt")
        torch.save(torch.unique(ids, return_counts=True)[1], d / "freq.pt")
        cluster_import.run(rd.root, d, "temi", c)
    return rd


def test_from_existing_gives_the_papers_cifar10_c_max_on_the_official_grid(tmp_path, capsys):
    rd = _import_grid(tmp_path, OFFICIAL_CIFAR10)
    capsys.readouterr()
    assert cli.main(["bound", "--run-dir", str(rd.root), "--from-existing"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "500" and "no TEMI run" in out.err
    t = json.loads((rd.bound / "table.json").read_text())
    assert t["c_max"] == 500 and t["bounded"] and t["next_above"] == 600 and t["from_existing"]
    assert [row["clusters"] for row in t["rows"]] == sorted(OFFICIAL_CIFAR10)
    assert {row["clusters"]: row["used_clusters"] for row in t["rows"]} == OFFICIAL_CIFAR10
    assert all(row["imported"] for row in t["rows"]) and t["temi_runs"]["computed"] == []
    assert (rd.bound / "r_c.png").stat().st_size > 1000
    # the rule is the search's: the largest C with r_C > alpha (non-monotone rows included)
    assert bound.largest_passing({row["clusters"]: row["r_c"] for row in t["rows"]}) == (500, 600)
    # the same clusterings: reused; a range narrower than the grid: another table
    assert cli.main(["bound", "--run-dir", str(rd.root), "--from-existing"]) == 0
    assert "up to date" in capsys.readouterr().err
    assert cli.main(["bound", "--run-dir", str(rd.root), "--from-existing", "--max-clusters", "400",
                     "--force"]) == 0
    t = json.loads((rd.bound / "table.json").read_text())
    assert t["c_max"] == 400 and not t["bounded"] and "lower bound" in t["note"]


def test_from_existing_errors(tmp_path, capsys):
    rd = _import_grid(tmp_path, {20: 10, 40: 12}, n=100)
    capsys.readouterr()
    assert cli.main(["bound", "--run-dir", str(rd.root), "--from-existing"]) == 2
    assert "r_C <= alpha 0.96 at every clustering" in capsys.readouterr().err
    assert cli.main(["bound", "--run-dir", str(rd.root), "--from-existing", "--tol", "3"]) == 2
    assert "drop --tol" in capsys.readouterr().err
    assert cli.main(["bound", "--run-dir", str(rd.root), "--from-existing", "--c-start", "50"]) == 2
    err = capsys.readouterr().err
    assert "no finished TEMI clustering" in err and len(err.strip().splitlines()) == 1
    assert not rd.bound.exists()
