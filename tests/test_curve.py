"""FD against training Mimg: snapshots, `cedm curve`, the sample efficiency and its report section
(the paper's Figs. 2 and 9; docs/method.md#sample-efficiency)."""
import re

import numpy as np
import pytest
import torch

from cedm import curve, evaluate, report, sample, train
from cedm.checkpoint import snapshots
from cedm.io import CedmError, RunDir, load_json, load_tensors, save_json, write_manifest
from test_bad_input import rerecord
from test_report import make_run as make_report_run
from test_train import SMALL, _states_equal, make_run

pytestmark = pytest.mark.usefixtures("one_thread")
STEP = 8e-6   # one step of SMALL's batch 8, in Mimg


def test_snapshots_at_every_multiple_and_at_the_end(tmp_path):
    make_run(tmp_path)
    train.run(tmp_path, "temi-C5", mimg=10 * STEP, snapshot_every_mimg=3 * STEP, **SMALL)
    tdir = RunDir(tmp_path).train("temi-C5")
    assert [n for n, _ in snapshots(tdir)] == [24, 48, 72, 80]
    _states_equal(load_tensors(snapshots(tdir)[-1][1]), load_tensors(tdir / "network.safetensors"))
    first, last = load_tensors(snapshots(tdir)[0][1]), load_tensors(snapshots(tdir)[-1][1])
    assert any(not torch.equal(first[k], last[k]) for k in first)     # weights along training
    assert load_json(tdir / "manifest.json")["config"]["snapshot_every_mimg"] == pytest.approx(3 * STEP)


def test_snapshots_of_a_killed_and_resumed_run_are_bit_identical(tmp_path):
    kw = dict(SMALL, mimg=12 * STEP, snapshot_every_mimg=2 * STEP, checkpoint_every_kimg=0.032)
    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    train.run(tmp_path / "a", "temi-C5", **kw)
    assert train.run(tmp_path / "b", "temi-C5", max_steps=7, **kw)["stopped"]   # killed after step 7
    train.run(tmp_path / "b", "temi-C5", **kw)                                  # resumed from step 4
    a, b = snapshots(RunDir(tmp_path / "a").train("temi-C5")), snapshots(RunDir(tmp_path / "b").train("temi-C5"))
    assert [n for n, _ in a] == [n for n, _ in b] == [16 * k for k in range(1, 7)]
    for (_, pa), (_, pb) in zip(a, b):
        _states_equal(load_tensors(pa), load_tensors(pb))


def test_bad_snapshot_interval_is_an_error_that_writes_nothing(tmp_path):
    make_run(tmp_path)
    for bad in (0.0, -1.0, 11 * STEP):
        with pytest.raises(CedmError, match="--snapshot-every-mimg"):
            train.run(tmp_path, "temi-C5", mimg=10 * STEP, snapshot_every_mimg=bad, **SMALL)
    assert not RunDir(tmp_path).train("temi-C5").exists()


def test_mimg_to_reach_interpolates_between_snapshots():
    pts = [{"mimg": 0.1, "fd": 50.0}, {"mimg": 0.2, "fd": 30.0}, {"mimg": 0.4, "fd": 10.0}]
    assert curve.mimg_to_reach(pts, 60.0) == pytest.approx(0.1)
    assert curve.mimg_to_reach(pts, 20.0) == pytest.approx(0.3)
    assert curve.mimg_to_reach(pts, 30.0) == pytest.approx(0.2)
    assert curve.mimg_to_reach(pts, 5.0) is None


def test_sample_efficiency_is_the_uncond_budget_over_the_mimg_to_match_it():
    curves = {"uncond": [{"mimg": 0.1, "fd": 40.0}, {"mimg": 0.2, "fd": 20.0}],
              "labels": [{"mimg": 0.05, "fd": 30.0}, {"mimg": 0.1, "fd": 10.0}],
              "temi-C10": [{"mimg": 0.1, "fd": 35.0}, {"mimg": 0.2, "fd": 25.0}]}
    eff = curve.sample_efficiency(curves)
    assert eff["target_fd"] == 20.0 and eff["reference_mimg"] == 0.2
    assert eff["models"]["labels"]["mimg"] == pytest.approx(0.075)
    assert eff["models"]["labels"]["ratio"] == pytest.approx(0.2 / 0.075)
    assert eff["models"]["temi-C10"]["ratio"] is None
    assert curve.sample_efficiency({"labels": curves["labels"]}) == {}


def _pixel_judge(monkeypatch):
    """A plain feature extractor (mean colour per 4x4 block) instead of the evaluation's networks."""
    def extract(images):
        x = np.asarray(images, np.float32)
        n, h = x.shape[:2]
        return x.reshape(n, h // 4, 4, h // 4, 4, 3).mean((2, 4)).reshape(n, -1)

    monkeypatch.setattr(evaluate, "choose_extractor",
                        lambda *a, **k: ("fd_blocks", "FD of block means (test)", extract, None))
    return extract


def test_curve_scores_every_snapshot_like_evaluate(tmp_path, monkeypatch):
    extract = _pixel_judge(monkeypatch)
    make_run(tmp_path, n=32)
    train.run(tmp_path, "uncond", mimg=6 * STEP, snapshot_every_mimg=3 * STEP, **SMALL)
    with pytest.raises(CedmError, match="no finished training run"):
        curve.run(tmp_path, "temi-C5", metric="backbone", num=16)
    c = curve.run(tmp_path, "uncond", metric="backbone", num=16)
    assert [p["mimg"] for p in c["points"]] == pytest.approx([24e-6, 48e-6])
    # the last point is the trained model's FD, sampled as `cedm sample` does (seeds 0..num-1)
    net, meta = sample.load_network(RunDir(tmp_path).train("uncond"))
    imgs = sample.generate(net, meta, 16, progress=False)["images"]
    ref = evaluate.reference_statistics(tmp_path, "fd_blocks", extract)
    want = evaluate.frechet_distance(evaluate.feature_statistics(extract(imgs)), ref)
    assert c["points"][-1]["fd"] == pytest.approx(want, rel=1e-6)
    assert all(np.isfinite(p["fd"]) for p in c["points"])
    assert curve.run(tmp_path, "uncond", metric="backbone", num=16) == c          # skipped, same result


def test_curve_samples_at_the_precision_cedm_sample_picks_and_records_it(tmp_path, monkeypatch):
    """The sampling precision is the model's default on the device (as `cedm sample`), or the
    flag; recorded in the config. A curve made before it was recorded (fp32) is reused at fp32
    and refused, with the reason, under a bf16 default."""
    from cedm.io import MANIFEST

    _pixel_judge(monkeypatch)
    make_run(tmp_path, n=32)
    train.run(tmp_path, "uncond", mimg=4 * STEP, snapshot_every_mimg=4 * STEP, **SMALL)
    out = RunDir(tmp_path).curve("uncond")
    c = curve.run(tmp_path, "uncond", metric="backbone", num=8)            # tiny: fp32 everywhere
    man = load_json(out / MANIFEST)
    assert man["config"]["precision"] == "fp32"
    man["config"].pop("precision")                                         # as written before the key
    save_json(out / MANIFEST, man)
    assert curve.run(tmp_path, "uncond", metric="backbone", num=8) == c    # the same stage: reused
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    tdir = RunDir(tmp_path).train("uncond")
    save_json(tdir / "network.json", dict(load_json(tdir / "network.json"), network="cifar"))   # default bf16
    rerecord(tdir / "network.json")
    with pytest.raises(CedmError, match="before cedm recorded the sampling precision.*--force"):
        curve.run(tmp_path, "uncond", metric="backbone", num=8)
    assert curve.run(tmp_path, "uncond", metric="backbone", num=8, precision="fp32") == c
    b = curve.run(tmp_path, "uncond", metric="backbone", num=8, force=True)
    assert load_json(out / MANIFEST)["config"]["precision"] == "bf16"
    assert b["points"][0]["fd"] != c["points"][0]["fd"]                    # sampled again, in bf16


def test_curve_needs_snapshots(tmp_path):
    make_run(tmp_path, n=32)
    train.run(tmp_path, "uncond", mimg=2 * STEP, **SMALL)
    with pytest.raises(CedmError, match="no snapshots.*--snapshot-every-mimg"):
        curve.run(tmp_path, "uncond", metric="backbone", num=16)
    assert not RunDir(tmp_path).curve("uncond").exists()


def test_report_plots_the_curves_and_states_the_ratio(tmp_path):
    rd = make_report_run(tmp_path / "run")
    for cond, fds in (("uncond", (40.0, 20.0)), ("temi-C4", (18.0, 12.0))):
        save_json(rd.curve(cond) / "curve.json", {"cond": cond, "metric": "fd_pixels", "label": "FD (pixels)",
                                                   "points": [{"mimg": 0.1, "fd": fds[0]},
                                                              {"mimg": 0.2, "fd": fds[1]}]})
        write_manifest(rd.curve(cond), "curve", {"cond": cond})
    page = report.build(rd.root).read_text()
    assert "<h2>Sample efficiency</h2>" in page
    assert re.search(r"temi-C4: reaches uncond&#x27;s FD 20\.000 .* after 0\.1 Mimg: <b>2\.00x</b>", page)
    md = (rd.report / "report.md").read_text()
    assert "- temi-C4: reaches uncond's FD 20.000 (at 0.2 Mimg) after 0.1 Mimg: **2.00x**" in md
    assert len(re.findall(r"<img ", page)) == 2 + 1 + 2 + 4 + 1     # test_report's figures + the curves
