"""The `cedm` command: one subcommand per pipeline stage (docs/method.md#pipeline).

Each stage module exposes `register(subparsers)`, which adds its subcommand(s) and sets
`func` on the parser; `func(args)` does the work. User errors (CedmError) are printed as one
line on stderr with exit status 2; nothing half-written is left behind (writes are atomic).
"""
from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from cedm import threads

        threads.configure(args.threads)
        rc = args.func(args)
    except CedmError as e:
        print(f"cedm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cedm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
