"""What a newcomer breaks, through the CLI (issue 26): every flag that names a file, a folder, a
host or a port is checked before any work, every skip checks the bytes it skips over, and a bad
input is exit code 2 with one line naming the problem and the fix, no traceback, nothing
half-written and the previous good result intact."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from cedm import cli, pipeline, train
from cedm.io import load_tensors

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.err


def _user_error(rc, err, *needles):
    """Exit code 2, one line on stderr, no traceback, naming what it must."""
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def _tree(root: Path) -> dict:
    """{relative path: bytes} of every file under root (what "intact" compares)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rerecord(path: Path) -> None:
    """A test edits a finished result by hand: its stage's manifest records the new bytes, or the
    edit is damage (cedm.pipeline.damage). Not for users: a redo is the way to change a result."""
    man_path = path.parent / "manifest.json"
    man = json.loads(man_path.read_text())
    man[pipeline.FILES][path.name] = pipeline.fingerprint(path)
    man_path.write_text(json.dumps(man))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A digits run (200 images) with data, features (pixels) and knn made through the CLI."""
    run = tmp_path_factory.mktemp("prepared") / "run"
    for argv in (["data", "--dataset", "digits", "--limit", "200"], ["features"], ["knn"]):
        assert cli.main([argv[0], "--run-dir", str(run), *argv[1:]]) == 0
    return run


@pytest.fixture()
def run(prepared, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(prepared, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# 3. A damaged input is never reused; a damaged result of the stage itself is redone

def test_a_damaged_input_is_an_error_naming_the_file_and_a_damaged_output_is_redone(run, capsys):
    feats, knn = run / "features" / "features.npy", run / "knn" / "knn.npy"
    good_feats, good_knn = feats.read_bytes(), _tree(run / "knn")
    feats.write_bytes(good_feats[:1000])                  # truncated, manifest intact
    _user_error(*_cli(capsys, "knn", "--run-dir", run), "features/features.npy is 1000 bytes",
                "run the `cedm features` command")
    assert _tree(run / "knn") == good_knn                 # the previous result is untouched
    rc, err = _cli(capsys, "features", "--run-dir", run, "--shard", "0/2")
    assert rc == 0 and "has nothing to do" not in err     # a shard does not skip over a damaged result
    rc, err = _cli(capsys, "features", "--run-dir", run)
    assert rc == 0 and "it is damaged (features.npy is 1000 bytes" in err and "redoing it" in err, err
    assert feats.read_bytes() == good_feats               # pixels features are deterministic
    rc, err = _cli(capsys, "knn", "--run-dir", run)
    assert rc == 0 and "inputs changed" in err
    assert knn.read_bytes() == good_knn["knn.npy"]

    # Same size, other bytes (the start of the array zeroed): redone, not skipped.
    b = bytearray(knn.read_bytes())
    b[200:400] = bytes(200)
    knn.write_bytes(bytes(b))
    rc, err = _cli(capsys, "knn", "--run-dir", run)
    assert rc == 0 and "knn.npy is not the file that was written" in err and "redoing it" in err, err
    assert knn.read_bytes() == good_knn["knn.npy"]
    rc, err = _cli(capsys, "knn", "--run-dir", run)
    assert rc == 0 and "up to date" in err                # and then skipped again


def test_a_manifest_from_before_file_records_still_skips(run, capsys):
    man = json.loads((run / "knn" / "manifest.json").read_text())
    man.pop(pipeline.FILES)
    (run / "knn" / "manifest.json").write_text(json.dumps(man))
    rc, err = _cli(capsys, "knn", "--run-dir", run)
    assert rc == 0 and "up to date" in err


def test_a_redo_of_a_damaged_training_does_not_carry_the_damaged_file_over(tmp_path, capsys):
    from test_train import SMALL, make_run

    make_run(tmp_path)
    kw = dict(SMALL, mimg=24e-6, device="cpu")
    train.run(tmp_path, "temi-C5", **kw)
    out = tmp_path / "train" / "temi-C5"
    good = {k: v.clone() for k, v in load_tensors(out / "network.safetensors").items()}   # not the mmap
    (out / "network.safetensors").write_bytes(b"torn")
    train.run(tmp_path, "temi-C5", **kw)                  # redone: resumes the intact state.pt at its end
    err = capsys.readouterr().err
    assert "network.safetensors is 4 bytes" in err and "redoing it" in err
    again = load_tensors(out / "network.safetensors")
    assert good.keys() == again.keys() and all(torch.equal(good[k], again[k]) for k in good)
