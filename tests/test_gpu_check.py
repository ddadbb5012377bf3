"""benchmarks/gpu_check.py (`make gpu-check`) where no GPU exists: the clear refusal, and the
section runner's robustness (a crash or a hang is one FAIL row, the table still comes out).
The GPU measurements themselves only run on a CUDA machine."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def _env(**kw):
    e = {k: v for k, v in os.environ.items() if k != "OUT"}
    return dict(e, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **kw)


def test_without_cuda_it_refuses_clearly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=_env(CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path)))
    assert r.returncode == 2
    assert "gpu-check: no CUDA device visible to torch" in r.stderr and "nothing was run" in r.stderr
    assert not (tmp_path / "gpu_check.md").exists()


def test_cpu_only_with_smoke():
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2 and "only for --smoke" in r.stderr


def _py(code):
    return [sys.executable, "-c", code]


def test_a_crashing_section_is_one_fail_row():
    rows = gpu_check.run_section("ops", 60, _py("raise RuntimeError('kernel launch failed: bad thing')"))
    assert len(rows) == 1 and rows[0]["status"] == "FAIL" and rows[0]["check"] == "ops"
    assert "exit 1" in rows[0]["result"] and "kernel launch failed: bad thing" in rows[0]["note"]


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "zombie" not in state


def test_a_hanging_section_is_killed_with_its_children(tmp_path):
    # the child starts a grandchild (as make / pytest do); both must be gone after the limit
    pidfile = tmp_path / "pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(300)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    rows = gpu_check.run_section("tests", 3, _py(code))
    assert rows[0]["status"] == "FAIL" and rows[0]["result"] == "timed out after 3 s"
    pid = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(pid):
            break
        import time
        time.sleep(0.1)
    assert not _alive(pid)


def test_section_rows_pass_through_and_ratios_are_derived(tmp_path):
    code = ("import json, sys; p = sys.argv[sys.argv.index('--json') + 1]; "
            "json.dump([{'check': 'train-ref', 'result': '10 img/s', 'goal': '', 'status': 'INFO', "
            "'note': '', 'metric': 10.0}], open(p, 'w'))")
    rows = gpu_check.run_section("train-ref", 60, _py(code))
    assert rows[0]["check"] == "train-ref" and rows[0]["metric"] == 10.0
    rows.append(gpu_check._row("train-bf16", "14 img/s") | {"metric": 14.0})
    rows.append(gpu_check._row("train-fp16", "12 img/s") | {"metric": 12.0})
    derived = {r["check"]: r for r in gpu_check._derived(rows)}
    bf16 = derived["train img/s, ours bf16 / reference at EDM's settings"]
    fp16 = derived["train img/s, ours fp16 / reference at EDM's settings"]
    assert bf16["result"] == "1.40x" and bf16["status"] == "PASS"
    assert fp16["result"] == "1.20x" and fp16["status"] == "FAIL"
    text = gpu_check.table(rows + list(derived.values()), "# t")
    assert "| train-bf16 | 14 img/s |" in text and "1 FAIL, 1 PASS" in text


@pytest.mark.slow
def test_cpu_smoke_writes_the_table(tmp_path):
    """The real sections (opcheck, fused-op timings) at toy sizes on the CPU, and $OUT/gpu_check.md."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--smoke",
                        "--only", "opcheck,ops"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=_env(OUT=str(tmp_path)))
    assert r.returncode in (0, 1), r.stderr[-2000:]  # 1: some goal not met at toy sizes
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| opcheck: 9 ops on cpu, float32 | 16/16 pass | all | PASS |" in md
    assert "op: Heun step bandwidth / device copy bandwidth" in md and "error" not in md


def test_knn_cost_model_scales_with_n_squared():
    rate, at = gpu_check.knn_cost(10_000, 768, 2.0, sizes=(10_000, 20_000, 1_000_000))
    assert rate == 10_000 ** 2 * 768 / 2 / 2.0
    assert at[10_000] == 2.0 and at[20_000] == 8.0 and at[1_000_000] == 2.0 * 100 ** 2
