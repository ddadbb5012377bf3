"""The README's two set-up commands are what CI runs and what a new user types."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The command lines of the README's "Set-up: the two commands" block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up: the two commands.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no set-up block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_command_verbatim():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    test_cmd = cmds[1]
    assert test_cmd.endswith("&& pytest"), test_cmd      # the console script, not `python -m pytest`
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci, f"{test_cmd!r} is not a line of .ci/run"


def test_plain_pytest_collects_the_suite():
    """The console script puts only the test's folder on sys.path; pyproject's pythonpath must
    add the checkout (tests import `benchmarks`), or collection stops with an error."""
    import shutil

    exe = shutil.which("pytest") or str(Path(sys.executable).with_name("pytest"))
    r = subprocess.run([exe, "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_gpu_check.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "error" not in r.stdout.lower().splitlines()[-1], r.stdout[-500:]


def readme_cedm_commands() -> list[str]:
    """Every `cedm ...` command of the README's bash blocks (comments cut, `&&` chains split)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            code = "" if line.lstrip().startswith("#") else line.split(" #")[0]
            out += [part.strip() for part in code.split("&&") if part.strip().startswith("cedm ")]
    return out


def test_every_readme_cedm_command_parses():
    """Each command a reader copies from the README is accepted by the CLI as written (every flag
    exists, every choice is valid); `cedm sweep --dataset folder ...` takes --resolution too."""
    import shlex

    from cedm.cli import build_parser

    cmds = readme_cedm_commands()
    assert len(cmds) >= 15 and "cedm run" in cmds
    parser = build_parser()
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0 and argv[-1] == "--help", f"README command does not parse: {cmd}"
            continue
        assert getattr(args, "func", None), cmd
    args = parser.parse_args(["sweep", "--dataset", "folder", "--source", "x.zip", "--resolution", "64"])
    assert args.resolution == 64
