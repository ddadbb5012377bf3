"""The `cedm` command: one subcommand per pipeline stage (docs/method.md#pipeline).

Each stage module exposes `register(subparsers)`, which adds its subcommand(s) and sets
`func` on the parser; `func(args)` does the work. User errors (CedmError) are printed as one
line on stderr with exit status 2; nothing half-written is left behind (writes are atomic).
Before any work, `check_args` resolves the default --run-dir (the last run prepared) and checks
every flag that names a file, a folder, a host or a port.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from cedm.io import CedmError
from cedm.pipeline import add_common, resolve_device  # noqa: F401  (re-exported)

# (module, ...) in pipeline order; each module registers its own subcommands.
STAGE_MODULES = (
    "cedm.data", "cedm.features", "cedm.clip_labels", "cedm.knn", "cedm.cluster", "cedm.bound",
    "cedm.train", "cedm.dist", "cedm.sample", "cedm.evaluate", "cedm.curve", "cedm.guidance", "cedm.report", "cedm.plan", "cedm.sweep",
    "cedm.sweep_exit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cedm",
        description="Label-free conditional image generation: cluster an unlabeled image set with "
                    "TEMI on frozen features, bound the useful number of clusters (C_max), train "
                    "cluster-conditional EDM (C-EDM), sample, evaluate and report. "
                    "Run `cedm run` for the built-in default (digits, a few minutes on a CPU).",
    )
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: $OMP_NUM_THREADS, else the CPUs this "
                             "process may use: affinity and cgroup CPU quota; cedm.threads)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a stage not present in this build
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return parser


# Flags that name something outside the run directory, checked before any work (a one-line error):
INPUT_FILES = ("weights", "inception_weights", "dinov2_weights", "clip_weights", "model_config")  # must exist
OUTPUT_FILES = ("next_out", "c_max_out")     # written: must not be a folder, nor lie under a file
OUTPUT_DIRS = ("outputs", "runs", "out")    # created: must not be a file, nor lie under one (out: report)
PORTS = ("metrics_port",)                    # served: 1..65535


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args) -> None:
    """Resolve --run-dir's default and check every flag that names a file, a folder, a host or a
    port before any work: what is wrong and the fix, in one line (CedmError)."""
    from cedm import pipeline, telemetry

    if "run_dir" in vars(args):
        if args.run_dir is None and not getattr(args, "starts_run", True):
            args.run_dir = pipeline.run_dir_default(args.command)
        if args.run_dir is not None:
            pipeline.check_run_dir(args.run_dir)
    for dest in INPUT_FILES:
        value = getattr(args, dest, None)
        if value and not Path(value).is_file():
            raise CedmError(f"{_flag(dest)} {value}: no such file"
                            + ("; pass the file, or leave the flag out to use the hub cache" if dest != "model_config" else ""))
    for dest in OUTPUT_FILES:
        value = getattr(args, dest, None)
        if value and Path(value).is_dir():
            raise CedmError(f"{_flag(dest)} {value} is a folder; name the file to write")
        bad = pipeline.file_in_the_way(Path(value).parent) if value else None
        if bad is not None:
            raise CedmError(f"{_flag(dest)} {value} lies under {bad}, which is a file; name a file in a folder")
    for dest in OUTPUT_DIRS:
        value = getattr(args, dest, None)
        bad = pipeline.file_in_the_way(value) if value else None
        if bad is not None:
            raise CedmError(f"{_flag(dest)} {value}: {bad} is a file, not a folder; name a folder (created when missing)")
    for dest in PORTS:
        value = getattr(args, dest, None)
        if value is not None and not 1 <= value <= 65535:
            raise CedmError(f"{_flag(dest)} {value} is not a port; use 1-65535, or leave it out")
    if getattr(args, "pushgateway", None):
        telemetry.check_gateway(args.pushgateway)


def run(args) -> int:
    """Run parsed arguments: check them, then the command; CedmError and KeyboardInterrupt propagate
    (`main` prints them; the local sweep runs its stages through this)."""
    try:
        from cedm import threads

        threads.configure(args.threads)
        check_args(args)
        return int(args.func(args) or 0)
    finally:
        if getattr(args, "starts_run", False):      # data / sweep / run: the last run prepared
            from cedm import pipeline

            pipeline.remember_run(args.run_dir)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return exit_code(args.command, lambda: run(args))


def exit_code(command: str, fn) -> int:
    """fn()'s exit status, with the CLI's rule for what fails: a CedmError (the user's input) is
    one line and exit 2, Ctrl-C one line and exit 130 (main and the sweep's child processes)."""
    try:
        return int(fn() or 0)
    except CedmError as e:
        print(f"cedm {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cedm {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
