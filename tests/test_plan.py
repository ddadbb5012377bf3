"""cedm.plan: the sweep's plan (`cedm plan`), its up-front validation, the conditionings after the
bound (`cedm conds`), C_V and the verdict; and that argo/sweep.yaml's plan template runs it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cedm import plan
from cedm.cli import main
from cedm.config import PRESETS
from cedm.io import CedmError, RunDir, save_json

ROOT = Path(__file__).resolve().parents[1]


def _template(path: str, name: str) -> dict:
    doc = yaml.safe_load((ROOT / path).read_text())
    return next(t for t in doc["spec"]["templates"] if t["name"] == name)


def _argv(template: dict, values: dict) -> list[str]:
    """The template's container command line with {{inputs.parameters.x}} filled from `values`."""
    c = template["container"]
    assert c["command"] == ["cedm"]
    out = []
    for a in c["args"]:
        for k, v in values.items():
            a = a.replace(f"{{{{inputs.parameters.{k}}}}}", v)
        assert "{{" not in a, a
        out.append(a)
    return out


def _outputs(template: dict, outdir: Path) -> dict:
    """The template's declared output parameters, read from where Argo would read them."""
    got = {}
    for p in template["outputs"]["parameters"]:
        path = p["valueFrom"]["path"]
        assert path.startswith("/tmp/outputs/")
        got[p["name"]] = (outdir / path.removeprefix("/tmp/outputs/")).read_text()
    return got


def _run_template(template: dict, values: dict, outdir: Path, capsys) -> tuple[int, dict | None, str]:
    argv = [str(outdir) if a == "/tmp/outputs" else a for a in _argv(template, values)]
    argv = [a.replace("/tmp/outputs/", f"{outdir}/") for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, (_outputs(template, outdir) if rc == 0 else None), err


SWEEP_ARGS = {"dataset": "cifar10", "run": "", "source": "", "clusters": "", "candidates": "", "mimg": "",
              "gpus": "4", "nodes": "1", "clip-labels": ""}


def test_sweep_plan_template_takes_the_preset_and_overrides(tmp_path, capsys):
    tpl = _template("argo/sweep.yaml", "plan")
    rc, out, err = _run_template(tpl, SWEEP_ARGS, tmp_path / "a", capsys)
    assert rc == 0, err
    p = PRESETS["cifar10"]
    assert out["run-dir"] == "/data/runs/cifar10"
    assert json.loads(out["clusters"]) == list(p.clusters) and json.loads(out["candidates"]) == list(p.candidates)
    assert float(out["mimg"]) == p.mimg and int(out["sample-num"]) == p.fid_samples * p.fid_sets
    assert int(out["num"]) == p.fid_samples and int(out["sets"]) == p.fid_sets
    assert out["train-cpu"] == "32" and out["train-memory"] == "256Gi"
    assert out["c-start"] == str(p.c_start)

    rc, out, err = _run_template(tpl, {**SWEEP_ARGS, "run": "c10-small", "clusters": "50, 20,20",
                                       "candidates": "20", "mimg": "0.5", "gpus": "1"}, tmp_path / "b", capsys)
    assert rc == 0, err
    assert out["run-dir"] == "/data/runs/c10-small" and json.loads(out["clusters"]) == [20, 50]
    assert json.loads(out["candidates"]) == [20] and out["c-start"] == str(min(p.c_start, 20))
    assert float(out["mimg"]) == 0.5 and out["train-cpu"] == "8" and out["train-memory"] == "64Gi"


def test_every_output_the_sweep_uses_is_written():
    sweep = yaml.safe_load((ROOT / "argo/sweep.yaml").read_text())
    declared = {p["name"] for p in _template("argo/sweep.yaml", "plan")["outputs"]["parameters"]}
    used = set()
    text = json.dumps(sweep)
    for name in declared | {"run-dir", "clusters", "candidates", "c-start", "mimg", "num", "sets",
                            "sample-num", "train-cpu", "train-memory"}:
        if f"tasks.plan.outputs.parameters.{name}}}" in text:
            used.add(name)
    assert used <= declared
    plan_keys = set(plan.resolve("digits"))
    assert plan_keys == declared                          # cedm plan writes exactly the declared outputs


@pytest.mark.parametrize("override,needle", [
    ({"candidates": "20,30"}, "candidate C = 30 not in the cluster list"),
    ({"gpus": "3"}, "global batch 1024 is not divisible by 3 GPUs"),
    ({"dataset": "ffhq64"}, "ffhq64 has no official download: pass --source"),
    ({"dataset": "afhqv2-64"}, "afhqv2-64 has no official download: pass --source"),
    ({"run": "../etc"}, "--run must be a plain directory name"),
    ({"run": "a/b"}, "--run must be a plain directory name"),
    ({"clusters": "10,ten"}, "--clusters must be a comma-separated list of integers"),
    ({"clusters": "1,10"}, "--clusters needs cluster counts >= 2"),
    ({"candidates": "[2.5]"}, "--candidates must be a comma-separated list of integers"),
    ({"mimg": "0"}, "--mimg must be a positive number"),
    ({"mimg": "-2"}, "--mimg must be a positive number"),
    ({"mimg": "lots"}, "--mimg must be a number"),
    ({"gpus": "0"}, "--gpus must be at least 1"),
])
def test_plan_rejects_impossible_inputs_with_one_line_and_exit_2(tmp_path, capsys, override, needle):
    tpl = _template("argo/sweep.yaml", "plan")
    out = tmp_path / "out"
    rc, _, err = _run_template(tpl, {**SWEEP_ARGS, **override}, out, capsys)
    assert rc == 2
    assert err.startswith("cedm plan: error: ") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()                               # nothing half-written for Argo to read


def test_plan_accepts_a_source_for_ffhq64_and_a_batch_that_divides(capsys):
    assert main(["plan", "--dataset", "ffhq64", "--source", "/data/ffhq.zip", "--gpus", "8"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train-cpu"] == 64 and shown["run-dir"] == "/data/runs/ffhq64"
    assert main(["plan", "--dataset", "afhqv2-64", "--source", "/data/afhq.zip"]) == 0
    assert json.loads(capsys.readouterr().out)["run-dir"] == "/data/runs/afhqv2-64"
    assert main(["plan", "--dataset", "cifar10", "--gpus", "3", "--batch", "960"]) == 0
    assert main(["plan", "--dataset", "cifar10", "--gpus", "3", "--batch", "1000"]) == 2
    assert "not divisible by 3 GPUs" in capsys.readouterr().err


def test_int_list():
    assert plan.int_list("10, 5,5", "--clusters") == [5, 10]
    assert plan.int_list("[20, 10]", "--candidates") == [10, 20]
    assert plan.int_list([40, 5], "--clusters") == [5, 40]
    assert plan.int_list("", "--clusters") is None and plan.int_list(None, "--clusters") is None
    with pytest.raises(CedmError, match="comma-separated list of integers"):
        plan.int_list("5,ten", "--clusters")
    with pytest.raises(CedmError, match="cluster counts >= 2"):
        plan.int_list("1,5", "--candidates")


def test_sweep_plan_defaults_are_the_presets():
    for pre in PRESETS.values():
        p = plan.sweep_plan(pre)
        assert p["clusters"] == sorted(pre.clusters) and p["candidates"] == sorted(pre.candidates)
        assert set(p["candidates"]) <= set(p["clusters"])     # every preset passes its own checks
        assert p["mimg"] == pre.mimg and p["batch"] == pre.batch and p["c_start"] == pre.c_start


def test_afhqv2_64_is_ffhq64_with_dropout_025():
    """AFHQv2-64 (the paper's fourth dataset): FFHQ-64's preset, generator dropout 0.25 (afhq64)."""
    from dataclasses import replace

    from cedm.data import DATASETS
    from cedm.networks import network_kwargs

    a, f = PRESETS["afhqv2-64"], PRESETS["ffhq64"]
    assert a == replace(f, name="afhqv2-64", network="afhq64") and "afhqv2-64" in DATASETS
    assert network_kwargs(a.network, a.resolution, 0)["dropout"] == 0.25
    assert network_kwargs(f.network, f.resolution, 0)["dropout"] == 0.05


def test_conditionings_keep_the_candidates_up_to_c_max():
    conds, left = plan.conditionings([10, 20, 50, 100, 200], 50, "temi", True, False)
    assert conds == ["uncond", "temi-C10", "temi-C20", "temi-C50"] and left == [100, 200]
    assert plan.conditionings("[10, 20]", 50, "kmeans", True, True)[0] == ["uncond", "labels", "kmeans-C10",
                                                                        "kmeans-C20"]
    assert plan.conditionings([100, 200], None, "temi", False, True)[0] == ["temi-C100", "temi-C200"]
    with pytest.raises(CedmError, match="no candidate C <= C_max = 50"):
        plan.conditionings([100, 200], 50, "temi", False, False)


def test_bound_select_template_writes_c_max_and_conds(tmp_path, capsys):
    tpl = _template("argo/bound.yaml", "select")
    run = tmp_path / "run"
    save_json(run / "bound" / "table.json", {"c_max": 50, "rows": []})
    args = {"run-dir": str(run), "candidates": "[10, 20, 50, 100, 200]", "method": "temi", "baselines": "true"}
    rc, out, err = _run_template(tpl, args, tmp_path / "o1", capsys)
    assert rc == 0, err
    assert out == {"c-max": "50", "conds": json.dumps(["uncond", "temi-C10", "temi-C20", "temi-C50"])}
    assert "not training C = [100, 200]" in err
    (run / "data").mkdir()
    np.save(run / "data" / "labels.npy", np.zeros(3))                    # a labelled dataset
    rc, out, _ = _run_template(tpl, {**args, "method": "kmeans"}, tmp_path / "o2", capsys)
    assert json.loads(out["conds"])[:3] == ["uncond", "labels", "kmeans-C10"]
    rc, _, err = _run_template(tpl, {**args, "baselines": "false", "candidates": "[100, 200]"}, tmp_path / "o3",
                               capsys)
    assert rc == 2 and "no candidate C <= C_max = 50" in err and not (tmp_path / "o3").exists()
    save_json(run / "bound" / "table.json", {"c_max": None})             # bound not reached
    rc, out, _ = _run_template(tpl, {**args, "baselines": "false", "candidates": "[100, 200]"}, tmp_path / "o4",
                               capsys)
    assert rc == 0 and json.loads(out["conds"]) == ["temi-C100", "temi-C200"] and out["c-max"] == "none"


def _evals(rd, fds: dict, metric="fid", label="FID", sets=3):
    """eval/<cond>/metrics.json as `cedm evaluate` writes them: {cond: (mean, std)}."""
    for cond, (mean, std) in fds.items():
        save_json(rd.eval(cond) / "metrics.json", {"mean": mean, "std": std, "sets": sets, "metric": metric,
                                                   "label": label, "values": [mean] * sets})
        save_json(rd.eval(cond) / "manifest.json", {})


def test_c_v_is_the_lowest_fd_among_clustered_models(tmp_path):
    m = {"uncond": {"mean": 1.0}, "temi-C5": {"mean": 3.0}, "temi-C10": {"mean": 2.0}, "kmeans-C5": {"mean": 0.5}}
    assert plan.pick_c_v(m, "temi")[0] == 10
    assert plan.pick_c_v({"uncond": {"mean": 1.0}}, "temi")[0] is None

    rd = RunDir(tmp_path / "run")
    save_json(rd.bound / "table.json", {"c_max": 40})
    _evals(rd, {"uncond": (9.0, 0.1), "temi-C10": (4.0, 0.1), "temi-C20": (5.0, 0.1)})
    v = plan.verdict(rd.root)
    assert v["c_v"] == 10 and v["c_max"] == 40 and v["gain_vs_uncond"] == 5.0 and v["case"] == "beats"
    assert v["bound_verdict"] == "C_V = 10 < C_max = 40, 2.0 doublings below the bound"
    assert v["verdict"].startswith("C_V = 10 beats the unconditional model by +61.2 σ (FD 4.000 against 9.000)")


def restated_z(m, s_m, n_m, b, s_b, n_b):
    """The verdict's comparison, restated (docs/method.md#verdict): the difference of the mean FDs
    over the standard error of that difference, each model's set-to-set std over sqrt(its sets)."""
    import math

    return (b - m) / math.sqrt(s_m ** 2 / n_m + s_b ** 2 / n_b)


@pytest.mark.parametrize("mean,std,sets,outcome", [
    (8.0, 1.0, 3, "beats"),          # z = 2.45
    (9.0, 1.0, 3, "ties"),           # z = 1.22: lower FD, within the noise
    (10.0, 1.0, 3, "ties"),
    (11.2, 1.0, 3, "ties"),          # z = -1.47
    (12.0, 1.0, 3, "worse"),         # z = -2.45
    (8.0, 1.0, 1, "no noise estimate"),
    (9.9, 0.0, 2, "beats"),          # no spread at all on either side: any gain is beyond noise
])
def test_versus_beats_ties_or_worse_against_a_restated_rule(mean, std, sets, outcome):
    base = {"mean": 10.0, "std": 1.0 if sets > 1 and std else 0.0, "sets": max(sets, 2)}
    r = plan.versus({"mean": mean, "std": std, "sets": sets}, base)
    assert r["outcome"] == outcome and r["delta"] == pytest.approx(10.0 - mean)
    if outcome != "no noise estimate" and (std or base["std"]):
        assert r["z"] == pytest.approx(restated_z(mean, std, sets, 10.0, base["std"], base["sets"]))
        assert (r["z"] >= plan.BEATS_SIGMA) == (outcome == "beats")


def test_c_v_is_chosen_among_the_conditionings_that_beat_uncond(tmp_path):
    """A C with the lowest FD that only ties (its sets spread widely) is not C_V; one that beats is."""
    rd = RunDir(tmp_path / "run")
    save_json(rd.bound / "table.json", {"c_max": 160})
    _evals(rd, {"uncond": (10.0, 1.0), "labels": (6.0, 0.5), "temi-C10": (8.0, 0.5), "temi-C20": (7.5, 3.0)})
    v = plan.verdict(rd.root)
    assert v["case"] == "beats" and v["c_v"] == 10 and v["best_c"] == 20
    assert v["comparisons"]["temi-C20"]["outcome"] == "ties" and v["comparisons"]["labels"]["outcome"] == "beats"
    assert v["verdict"].startswith("C_V = 10 beats the unconditional model by +3.1 σ")
    assert "labels +6.2 σ" in v["against_uncond"] and "temi-C20 +1.4 σ" in v["against_uncond"]


def test_no_conditioning_beats_uncond_is_said_and_no_c_v_is_claimed(tmp_path):
    rd = RunDir(tmp_path / "run")
    save_json(rd.bound / "table.json", {"c_max": 160})
    _evals(rd, {"uncond": (414.8, 37.8), "labels": (477.9, 33.8), "temi-C10": (431.1, 45.2),
                "temi-C20": (423.7, 43.0)}, metric="fd_pixels", label="pixel FD")
    v = plan.verdict(rd.root)
    assert v["case"] == "none beats" and v["c_v"] is None and v["best_c"] == 20
    assert v["verdict"] == ("no temi conditioning beats the unconditional model at this budget (best: C = 20, "
                            "−0.3 σ; FD 423.700 against 414.800)")
    assert v["comparisons"]["labels"]["outcome"] == "worse"


def test_the_verdict_never_mixes_metrics(tmp_path):
    """After `cedm evaluate --cond temi-C10 --metric classifier` in a pixel-FD run, C = 10's 88.2 is
    not ranked against the others' ~420: it is listed under other_metrics."""
    rd = RunDir(tmp_path / "run")
    _evals(rd, {"uncond": (414.8, 37.8), "temi-C20": (423.7, 43.0)}, metric="fd_pixels", label="pixel FD")
    _evals(rd, {"temi-C10": (88.2, 1.0)}, metric="classifier_fd", label="classifier FD")
    v = plan.verdict(rd.root)
    assert v["metric"] == "fd_pixels" and v["other_metrics"] == {"temi-C10": "classifier_fd"}
    assert v["best_c"] == 20 and "temi-C10" not in v["fd"] and v["case"] == "none beats"
    v = plan.verdict(rd.root, metric="classifier_fd")      # the sweep names its metric
    assert v["metric"] == "classifier_fd" and v["case"] == "no baseline" and v["c_v"] == 10


def test_c_v_is_never_a_c_above_c_max(tmp_path):
    """A model of a C above the bound (e.g. trained before the bound moved down) is no candidate."""
    m = {"temi-C10": {"mean": 4.0}, "temi-C40": {"mean": 3.0}, "temi-C80": {"mean": 1.0},
         "temi-C80@uniform": {"mean": 0.5}, "labels-coarse": {"mean": 0.1}}
    assert plan.pick_c_v(m, "temi")[0] == 80                       # no bound: every C
    assert plan.pick_c_v(m, "temi", c_max=40) == (40, {"mean": 3.0})   # C = C_max may be C_V
    assert plan.pick_c_v(m, "temi", c_max=20)[0] == 10
    assert plan.pick_c_v(m, "temi", c_max=5) == (None, {})
    rd = RunDir(tmp_path / "run")
    save_json(rd.bound / "table.json", {"c_max": 40})
    _evals(rd, {"temi-C10": (4.0, 0.1), "temi-C80": (1.0, 0.1)})
    v = plan.verdict(rd.root)
    assert v["c_v"] == 10 and v["case"] == "no baseline" and v["bound_verdict"].startswith("C_V = 10 < C_max = 40")


def test_cifar100_trains_its_coarse_labels_as_a_baseline(tmp_path):
    """The paper's Table 2: CIFAR-100 conditioned on its 20 super-classes, next to the 100 labels."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    np.save(run / "data" / "labels.npy", np.zeros(3))
    assert plan.label_tags(run) == ["labels"]
    np.save(run / "data" / "coarse_labels.npy", np.zeros(3))
    assert plan.label_tags(run) == ["labels", "labels:coarse"]
    conds, _ = plan.conditionings([10], None, "temi", True, plan.label_tags(run))
    assert conds == ["uncond", "labels", "labels:coarse", "temi-C10"]
    assert plan.conditionings([10], None, "temi", False, plan.label_tags(run))[0] == ["temi-C10"]
