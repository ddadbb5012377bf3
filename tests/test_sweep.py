"""cedm sweep / cedm run: the whole pipeline end to end, and continuing a killed sweep."""
import json

import numpy as np
import pytest

from cedm import sweep
from cedm.cli import main
from cedm.config import preset

SMALL = ["--clusters", "5,10,40", "--candidates", "5,10", "--mimg", "0.002", "--num", "48", "--sets", "2"]


def test_sweep_rejects_impossible_lists_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    for extra, needle in ((["--candidates", "5,30"], "candidate C = 30 not in the cluster list"),
                          (["--clusters", "1,5"], "cluster counts >= 2"),
                          (["--clusters", "5,x"], "comma-separated list of integers"),
                          (["--mimg", "0"], "--mimg must be a positive"),
                          (["--sets", "0"], "--sets and --num must be at least 1")):
        assert main(["run", "--run-dir", str(run), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not run.exists()                                   # nothing started, nothing written


def test_sweep_uses_the_plan_module():
    # one home for the planning: the sweep, the report and `cedm plan` / `cedm conds` share it
    from cedm import plan, report  # noqa: F401

    assert sweep.verdict is plan.verdict and sweep.sweep_plan is plan.sweep_plan
    assert sweep.conditionings is plan.conditionings


def _finished(run):
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("manifest.json")}


@pytest.mark.slow
def test_builtin_default_end_to_end_and_a_killed_sweep_continues(tmp_path, monkeypatch, capsys,
                                                                 inception_weights_file):
    import cedm.evaluate as ev

    run = tmp_path / "run"
    args = ["run", "--run-dir", str(run), *SMALL, "--snapshot-every-mimg", "0.001", "--ablations"]

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "run", killed)           # the sweep dies in its first evaluation
    assert main(args) != 0
    monkeypatch.undo()
    before = _finished(run)
    assert any(k.startswith("train/") for k in before) and not any(k.startswith("eval/") for k in before)

    capsys.readouterr()
    assert main(args) == 0
    after = _finished(run)
    # Finished stages were skipped, not recomputed: their manifests are untouched.
    assert {k: after[k] for k in before} == before
    assert any(k.startswith("eval/temi-C") for k in after)
    result = json.loads((run / "sweep.json").read_text())
    assert result["c_max"] >= 10 and result["best_c"] in (5, 10)
    assert result["case"] in ("beats", "none beats") and result["metric"] == "classifier_fd"   # digits' judge
    assert result["c_v"] in ((5, 10) if result["case"] == "beats" else (None,))
    c_v = result["c_v"] or result["best_c"]
    assert {s.split()[0] for s, _ in result["stage_seconds"]} >= {"data", "train", "sample", "evaluate", "bound"}
    assert set(result["conds"]) == {"uncond", "labels", "temi-C5", "temi-C10"}
    # consistency beside the FD: the labels' training images are their own class for the judge
    cons = json.loads((run / "eval" / "labels" / "metrics.json").read_text())["consistency"]
    assert 0 <= cons["samples"] <= 1 and cons["training"] > 0.9 and len(cons["per_group"]) == 10
    assert "consistency" not in json.loads((run / "eval" / "uncond" / "metrics.json").read_text())
    page = (run / "report" / "report.html").read_text()
    assert "C_V" in page and page.count("<img ") >= 6
    # snapshots every 0.001 Mimg of 0.002: an FD-against-Mimg curve per conditioning, in the report
    for cond in result["conds"]:
        pts = json.loads((run / "curve" / cond / "curve.json").read_text())["points"]
        assert [p["mimg"] for p in pts] == pytest.approx([0.001024, 0.002048], abs=1e-7)
    assert "<h2>Sample efficiency</h2>" in page and "Sample efficiency against the unconditional" in page
    # --ablations: Table 5 (TEMI gamma = 1 at C_max) and Table 4 (C_V's model, uniform labels) as rows
    assert (run / "cluster" / f"temi-C{result['c_max']}@gamma1" / "manifest.json").exists()
    assert (run / "eval" / f"temi-C{c_v}@uniform" / "metrics.json").exists()
    assert f"temi-C{c_v}@uniform" in page and "Table 5: TEMI with gamma = 1" in page
    out = capsys.readouterr().out.splitlines()          # stdout: the verdict alone, no stage's lines
    assert [line.split(":")[0] for line in out if line] == ["cedm sweep", "report"], out
    assert result["verdict"] in out[-2]

    # FID through the real torch-fidelity Inception path of `cedm evaluate` (a locally made file)
    assert main(["evaluate", "--run-dir", str(run), "--cond", "temi-C5", "--metric", "fid", "--force",
                 "--inception-weights", str(inception_weights_file), "--num", "24", "--sets", "2",
                 "--ref-images", "64"]) == 0
    m = json.loads((run / "eval" / "temi-C5" / "metrics.json").read_text())
    assert m["metric"] == "fid" and "fallback_reason" not in m and m["mean"] > 0 and len(m["values"]) == 2


def test_reproduce_fills_the_experiment_and_flags_still_win(monkeypatch):
    import inspect

    from cedm.config import REPRODUCTION as R

    seen = []
    sig = inspect.signature(sweep.sweep)
    monkeypatch.setattr(sweep, "sweep", lambda *a: seen.append(sig.bind(*a).arguments))
    assert main(["run", "--reproduce"]) == 0
    assert main(["run", "--reproduce", "--mimg", "0.1", "--run-dir", "elsewhere"]) == 0
    assert main(["run"]) == 0
    keys = ("run_dir", "dataset", "metric", "mimg", "snapshot_every_mimg")
    assert [tuple(a[k] for k in keys) for a in seen] == [
        (R.run_dir, "digits", None, R.mimg, R.snapshot_every_mimg),      # None: the preset's (classifier)
        ("elsewhere", "digits", None, 0.1, R.snapshot_every_mimg),
        ("runs/digits", "digits", None, None, None)]
    assert preset("digits").metric == "classifier" and preset("cifar10").metric == "fid"


def test_ablations_need_a_swept_run_and_name_what_is_missing(tmp_path, capsys):
    from cedm.io import save_array, write_manifest

    assert main(["ablations", "--run-dir", str(tmp_path / "none")]) == 2
    assert "no prepared dataset" in capsys.readouterr().err
    run = tmp_path / "run"
    save_array(run / "data" / "images.npy", np.zeros((4, 16, 16, 3), np.uint8))
    write_manifest(run / "data", "data", {"dataset": "digits", "resolution": 16})
    assert main(["ablations", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no TEMI clustering to ablate" in err and len(err.splitlines()) == 1


class _Stop(Exception):
    pass


@pytest.mark.parametrize("dataset,flags,want", [("cifar100", [], True), ("cifar10", [], False),
                                                ("cifar10", ["--clip-labels", "--clip-weights", "w.pt"], True),
                                                ("cifar100", ["--no-clip-labels"], False)])
def test_table2s_clip_labels_run_before_the_conditionings_are_chosen(tmp_path, monkeypatch, dataset, flags, want):
    """CIFAR-100's sweep labels its images with CLIP (labels:clip) before clustering, so `cedm
    conds` offers labels:clip beside labels and labels:coarse; other presets only when asked."""
    from cedm.io import RunDir, write_manifest

    write_manifest(RunDir(tmp_path).data, "data", {"dataset": dataset, "resolution": 32})
    seen = []

    def stage(argv):
        seen.append(argv)
        if argv[0] == "cluster":
            raise _Stop
    monkeypatch.setattr(sweep, "_stage", stage)
    args = ["sweep", "--run-dir", str(tmp_path), "--dataset", dataset, *flags]
    with pytest.raises(_Stop):
        sweep._sweep_main(__import__("cedm.cli", fromlist=["x"]).build_parser().parse_args(args), dataset, None)
    names = [a[0] for a in seen]
    assert ("clip-labels" in names) == want
    if want:
        assert names.index("clip-labels") < names.index("cluster")
        clip = seen[names.index("clip-labels")]
        assert ("--weights" in clip) == ("--clip-weights" in flags)


def test_train_jobs_one_per_thread_on_a_cpu_at_most_one_per_model(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert sweep.train_jobs("cpu", 4) == 2 and sweep.train_jobs("cpu", 1) == 1
    assert sweep.train_jobs("cpu", 4, jobs=1) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert sweep.train_jobs("cpu", 3) == 3 and sweep.train_jobs("cpu", 5, jobs=4) == 4
    with pytest.raises(sweep.CedmError, match="--jobs must be at least 1"):
        sweep.train_jobs("cpu", 3, jobs=0)


@pytest.mark.slow
def test_parallel_training_gives_the_weights_of_one_thread_training(tmp_path, monkeypatch, capsys):
    """train_all with two models at once (a process and one thread each) writes exactly what
    `cedm --threads 1 train` writes alone, and says which conditioning each line is from."""
    import shutil

    import torch

    from cedm.io import RunDir

    run = tmp_path / "run"
    assert main(["data", "--run-dir", str(run), "--dataset", "digits", "--limit", "128"]) == 0
    common = ["--run-dir", str(run), "--seed", "0", "--device", "cpu"]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    sweep.train_all(run, ["uncond", "labels"], common, ["--mimg", "0.001"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "2 models, 2 at once, 1 thread each" in err and "[labels] cedm train:" in err
    alone = tmp_path / "alone"
    shutil.copytree(run / "data", alone / "data")
    assert main(["--threads", "1", "train", "--run-dir", str(alone), "--cond", "labels", "--mimg", "0.001"]) == 0
    f = "network.safetensors"
    assert (RunDir(run).train("labels") / f).read_bytes() == (RunDir(alone).train("labels") / f).read_bytes()
    assert (RunDir(run).train("uncond") / "manifest.json").exists()
