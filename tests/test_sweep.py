"""cedm sweep / cedm run: the whole pipeline end to end, and continuing a killed sweep."""
import json

import pytest

from cedm import sweep
from cedm.cli import main
from cedm.io import CedmError

SMALL = ["--clusters", "5,10,40", "--candidates", "5,10", "--mimg", "0.002", "--num", "48", "--sets", "2"]


def test_list_flags_are_checked():
    assert sweep._ints("10, 5,5", "--clusters") == [5, 10]
    with pytest.raises(CedmError, match="--clusters must be a comma-separated list"):
        sweep._ints("5,ten", "--clusters")
    with pytest.raises(CedmError, match="cluster counts >= 2"):
        sweep._ints("1,5", "--candidates")


def test_c_v_is_the_lowest_fd_among_clustered_models():
    m = {"uncond": {"mean": 1.0}, "temi-C5": {"mean": 3.0}, "temi-C10": {"mean": 2.0}, "kmeans-C5": {"mean": 0.5}}
    assert sweep.pick_c_v(m, "temi")[0] == 10
    assert sweep.pick_c_v({"uncond": {"mean": 1.0}}, "temi")[0] is None


def _finished(run):
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("manifest.json")}


@pytest.mark.slow
def test_builtin_default_end_to_end_and_a_killed_sweep_continues(tmp_path, monkeypatch, capsys,
                                                                 inception_weights_file):
    import cedm.evaluate as ev

    run = tmp_path / "run"
    args = ["run", "--run-dir", str(run), *SMALL]

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "run", killed)           # the sweep dies in its first evaluation
    assert main(args) != 0
    monkeypatch.undo()
    before = _finished(run)
    assert any(k.startswith("train/") for k in before) and not any(k.startswith("eval/") for k in before)

    assert main(args) == 0
    after = _finished(run)
    # Finished stages were skipped, not recomputed: their manifests are untouched.
    assert {k: after[k] for k in before} == before
    assert any(k.startswith("eval/temi-C") for k in after)
    result = json.loads((run / "sweep.json").read_text())
    assert result["c_max"] >= 10 and result["c_v"] in (5, 10)
    assert set(result["conds"]) == {"uncond", "labels", "temi-C5", "temi-C10"}
    page = (run / "report" / "report.html").read_text()
    assert "C_V" in page and page.count("<img ") >= 6
    assert "C_V = " in capsys.readouterr().out

    # FID through the real torch-fidelity Inception path of `cedm evaluate` (a locally made file)
    assert main(["evaluate", "--run-dir", str(run), "--cond", "temi-C5", "--metric", "fid", "--force",
                 "--inception-weights", str(inception_weights_file), "--num", "24", "--sets", "2",
                 "--ref-images", "64"]) == 0
    m = json.loads((run / "eval" / "temi-C5" / "metrics.json").read_text())
    assert m["metric"] == "fid" and "fallback_reason" not in m and m["mean"] > 0 and len(m["values"]) == 2
