"""The local runner: `cedm sweep` (a whole cluster sweep) and `cedm run` (the built-in default).

The sweep calls the stage subcommands in-process with the same flags the Argo workflow uses:
data -> features -> knn -> cluster x C -> bound (C_max) -> [uncond, labels, candidates C <= C_max]
x (train -> sample) -> evaluate [-> curve, when models keep snapshots] -> pick C_V by FID/FDD
-> report. Each stage skips itself when
its outputs exist with the same config, so an interrupted sweep continues where it stopped.
What to cluster and train, C_V and the verdict come from cedm.plan, as on Argo (`cedm plan`,
`cedm conds`); the bound's rounds from cedm.bound.next_round (inside `cedm bound`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from cedm import telemetry
from cedm.conditioning import label_tags
from cedm.io import CedmError, RunDir, load_json, save_json
from cedm.plan import conditionings, int_list, sweep_plan, verdict


def _common_flags(run_dir, seed: int, device, force: bool, pushgateway) -> list[str]:
    """The flags every stage of a sweep gets."""
    return (["--run-dir", str(run_dir), "--seed", str(seed)] + (["--device", str(device)] if device else [])
            + (["--force"] if force else []) + (["--pushgateway", pushgateway] if pushgateway else []))


def _weight_flags(inception_weights=None, dinov2_weights=None) -> list[str]:
    """The feature extractors' weight files, for `cedm evaluate` and `cedm curve`."""
    return ((["--inception-weights", str(inception_weights)] if inception_weights else [])
            + (["--dinov2-weights", str(dinov2_weights)] if dinov2_weights else []))


def _eval_flags(metric: str, sets: int, num: int, weights: list[str]) -> list[str]:
    """`cedm evaluate`'s scoring flags, the same for the method's models and the ablations."""
    return ["--metric", metric, "--sets", str(sets), "--num", str(num), *weights]


_TIMES: list[list] = []    # [stage, seconds] of the stages this process ran (sweep.json "stage_seconds")


class _Prefixed:
    """A text stream that writes each line to stderr as `cedm <stage>: <line>` (a stage's stdout
    inside the sweep: `cedm bound`'s bare C_max for scripts is no bare number in the sweep's log)."""

    def __init__(self, stage: str):
        self.prefix, self.buf = f"cedm {stage}: ", ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            sys.stderr.write(f"{self.prefix}{line}\n" if line.strip() else "\n")
        return len(text)

    def flush(self) -> None:          # print(..., flush=True): a partial line waits for its end
        sys.stderr.flush()

    def close(self) -> None:
        if self.buf:
            self.write("\n")
        sys.stderr.flush()


def _stage(argv: list[str]) -> None:
    """Run one stage in-process. Its stdout (a stage's result line, `cedm bound`'s bare C_max for
    scripts) goes to stderr, prefixed with the stage: the sweep's stdout is its verdict alone. A
    result made by another command with another config is refused naming the stage and the two
    ways out."""
    import contextlib

    from cedm.cli import build_parser, run
    from cedm.pipeline import Conflict

    cmd = f"cedm {' '.join(argv)}"
    print(f"\n$ {cmd}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        out = _Prefixed(argv[0])
        try:
            with contextlib.redirect_stdout(out):
                rc = run(build_parser().parse_args(argv))
        finally:
            out.close()
    except Conflict as e:   # e.g. the user's own `cedm sample --force` with other flags: the two ways out
        raise CedmError(f"stage `{cmd}` conflicts with {e.out}: it was {e.reason} by another command; either "
                        f"redo it with this sweep's settings, `{cmd} --force` (replaces that result), then run the "
                        f"sweep again, or keep it and run the sweep with another --run-dir") from None
    except CedmError as e:
        print(f"cedm {argv[0]}: error: {e}", file=sys.stderr)
        rc = 2
    what = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--cond", "--clusters")), None)
    _TIMES.append([argv[0] + (f" {what}" if what else ""), round(time.perf_counter() - t0, 2)])
    if rc != 0:
        raise CedmError(f"stage `cedm {argv[0]}` failed (exit {rc}); fix it and run the sweep again "
                        f"(finished stages are kept)")


def sweep(run_dir, dataset: str, source=None, clusters=None, candidates=None, method: str = "temi",
          metric: str | None = None, mimg: float | None = None, num: int | None = None, sets: int | None = None,
          baselines: bool = True, seed: int = 0, device=None, force: bool = False,
          inception_weights=None, dinov2_weights=None, pushgateway=None,
          snapshot_every_mimg: float | None = None, ablations: bool = False, clip_labels: bool | None = None,
          clip_weights=None, resolution: int | None = None, jobs: int | None = None) -> dict:
    from cedm.config import preset

    if dataset != "folder":  # an unknown name or impossible lists fail before any work
        sweep_plan(preset(dataset), clusters, candidates, mimg)
    if (sets is not None and sets < 1) or (num is not None and num < 1):
        raise CedmError(f"--sets and --num must be at least 1, got {sets} and {num}")
    common = _common_flags(run_dir, seed, device, force, pushgateway)
    t0 = time.time()
    _TIMES.clear()

    _stage(["data", *common, "--dataset", dataset] + (["--source", str(source)] if source else [])
           + (["--resolution", str(resolution)] if resolution else []))
    from cedm.config import run_preset

    pre = run_preset(run_dir)
    metric = metric or pre.metric                    # the dataset's judge (Preset.metric)
    plan = sweep_plan(pre, clusters, candidates, mimg)
    clusters, candidates = plan["clusters"], plan["candidates"]
    _stage(["features", *common])
    _stage(["knn", *common])
    if pre.clip_labels if clip_labels is None else clip_labels:   # Table 2's CLIP pseudo-labels (labels:clip)
        _stage(["clip-labels", *common] + (["--weights", str(clip_weights)] if clip_weights else []))
    for c in clusters:
        _stage(["cluster", *common, "--method", method, "--clusters", str(c)])
    # The bound is a TEMI quantity (r_C of TEMI heads), whatever --method clusters for training.
    _stage(["bound", *common, "--c-start", str(plan["c_start"])])
    c_max = load_json(RunDir(run_dir).bound / "table.json").get("c_max")
    conds, skipped = conditionings(candidates, c_max, method, baselines, label_tags(run_dir))
    if skipped:
        print(f"cedm sweep: C_max = {c_max}: not training C = {skipped}", file=sys.stderr)

    sets = pre.fid_sets if sets is None else sets
    num = pre.fid_samples if num is None else num
    train_flags = ["--mimg", str(plan["mimg"])] if mimg is not None else []
    if snapshot_every_mimg:
        train_flags += ["--snapshot-every-mimg", str(snapshot_every_mimg)]
    train_all(run_dir, conds, common, train_flags, jobs)
    for cond in conds:
        _stage(["sample", *common, "--cond", cond, "--num", str(sets * num)])
    weights = _weight_flags(inception_weights, dinov2_weights)
    eval_flags = _eval_flags(metric, sets, num, weights)
    metrics = {}
    for cond in conds:
        _stage(["evaluate", *common, "--cond", cond, *eval_flags])
        metrics[cond] = load_json(RunDir(run_dir).eval(cond) / "metrics.json")
    if snapshot_every_mimg:   # FD against training Mimg from the snapshots (the report's curves)
        for cond in conds:
            _stage(["curve", *common, "--cond", cond, "--metric", metric, "--num", str(num), *weights])

    key = metrics[conds[0]]["metric"]             # the key the sweep's metric wrote (e.g. classifier_fd)
    if ablations:
        run_ablations(run_dir, common, method, metric, sets, num, weights)
    result = verdict(run_dir, method, key)
    from cedm.guidance import c_v_choice     # C_V at each C's best guidance setting (`cedm guidance`), and unguided

    if guided := c_v_choice(run_dir, method):
        result["guidance"] = guided
    result.update({"dataset": dataset, "conds": conds, "seconds": round(time.time() - t0, 1),
                   "stage_seconds": list(_TIMES)})
    save_json(RunDir(run_dir).root / "sweep.json", result)
    _stage(["report", *common[:2]])
    print(f"\ncedm sweep: C_max = {c_max}; {result['verdict']} [FD: {result['metric_label']}]\n"
          f"report: {RunDir(run_dir).report / 'report.html'}", flush=True)
    return result


def train_jobs(device, conds: int, jobs: int | None = None) -> int:
    """How many trainings run at once: on a CPU, one per torch thread (at most one per model), as
    `--jobs` caps it; on a GPU one. The tiny network's step does not use a second thread (measured:
    61.5 ms with one, 59.9 ms with two), so two one-thread processes train two models in about the
    time of one (docs/performance.md#the-first-run)."""
    import torch

    from cedm.pipeline import resolve_device

    if jobs is not None and jobs < 1:
        raise CedmError(f"--jobs must be at least 1, got {jobs}")
    if resolve_device(device).type != "cpu":
        return 1
    return max(1, min(conds, torch.get_num_threads(), jobs or conds))


def train_all(run_dir, conds: list[str], common: list[str], train_flags: list[str], jobs: int | None = None) -> None:
    """`cedm train` for every conditioning: one after another with all threads, or on a CPU with
    several threads `train_jobs` at once, each a process of its own with its share of the threads
    (the same stage, the same command; each result is what `cedm --threads T train ...` makes).
    One bar follows the images of all of them (their log.jsonl); their lines are prefixed with the
    conditioning. A failed training does not stop the others; the sweep then stops naming it."""
    import subprocess
    import threading

    import torch

    device = next((common[i + 1] for i, a in enumerate(common[:-1]) if a == "--device"), None)
    n = train_jobs(device, len(conds), jobs)
    if n < 2:
        for cond in conds:
            _stage(["train", *common, "--cond", cond, *train_flags])
        return
    from tqdm.auto import tqdm

    rd = RunDir(run_dir)
    threads = max(1, torch.get_num_threads() // n)
    print(f"\n$ cedm train {' '.join(common)} {' '.join(train_flags)} --cond ... ({len(conds)} models, {n} at "
          f"once, {threads} thread{'s' * (threads > 1)} each: {', '.join(conds)})", file=sys.stderr, flush=True)
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads))

    def done_images(cond: str) -> float:
        best = 0.0
        for d in (rd.train(cond), rd.train(cond).parent / f".{rd.train(cond).name}.redo"):
            try:
                lines = (d / "log.jsonl").read_text().splitlines()
                best = max(best, float(json.loads(lines[-1])["kimg"]) * 1e3) if lines else best
            except (OSError, ValueError, KeyError, IndexError):
                continue
        return best

    def pump(cond: str, stream) -> None:
        for line in stream:
            if line.strip():
                sys.stderr.write(f"[{cond}] {line}" if line.endswith("\n") else f"[{cond}] {line}\n")
                sys.stderr.flush()

    waiting, running, failed = list(conds), {}, []
    t_all = time.perf_counter()
    bar = tqdm(total=len(conds), unit="model", desc=f"train ({n} at once)", file=sys.stderr, disable=None)
    said = time.perf_counter()
    try:
        while waiting or running:
            while waiting and len(running) < n:
                cond = waiting.pop(0)
                argv = ["train", *common, "--cond", cond, *train_flags]
                p = subprocess.Popen([sys.executable, "-m", "cedm.sweep", "--threads", str(threads), *argv],
                                     stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                readers = [threading.Thread(target=pump, args=(cond, s), daemon=True) for s in (p.stdout, p.stderr)]
                for r in readers:
                    r.start()
                running[cond] = (p, readers, time.perf_counter())
            time.sleep(0.5)
            for cond, (p, readers, t0) in list(running.items()):
                if p.poll() is None:
                    continue
                for r in readers:
                    r.join()
                del running[cond]
                print(f"cedm sweep: {cond} trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                if p.returncode:
                    failed.append(f"{cond} (exit {p.returncode})")
                bar.update(1)
            status = ", ".join(f"{c} {done_images(c) / 1e3:.0f}k img" for c in running)
            bar.set_postfix_str(status)
            if bar.disable and running and time.perf_counter() - said > 30:   # a log without a bar
                print(f"cedm sweep: training {status}", file=sys.stderr, flush=True)
                said = time.perf_counter()
    except BaseException:                      # Ctrl-C: each training saves its step and stops
        for p, readers, _ in running.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, readers, _ in running.values():
            p.wait()
        raise
    finally:
        bar.close()
    _TIMES.append([f"train ({len(conds)} models, {n} at once)", round(time.perf_counter() - t_all, 2)])
    if failed:
        raise CedmError(f"training failed for {', '.join(failed)}: its lines above say why; fix it and run the "
                        f"sweep again (finished models are kept)")


def run_ablations(run_dir, common: list[str], method: str, metric: str, sets: int, num: int,
                  weights: list[str] = ()) -> dict:
    """The paper's Tables 4 and 5 for a finished sweep, as rows of its report
    (cedm.conditioning.ABLATIONS): TEMI with gamma = 1 at C_max (else the largest C clustered),
    and C_V's model sampled with uniform labels and scored like the others (`metric`, `sets` x
    `num` images, the extractors' `weights` flags). Returns {"c_gamma", "c_v"}."""
    from cedm.bound import finished

    rd = RunDir(run_dir)
    table = rd.bound / "table.json"
    c_gamma = (load_json(table).get("c_max") if table.exists() else None) or max(finished(rd) or [0]) or None
    if c_gamma is None:
        raise CedmError(f"{run_dir} has no TEMI clustering to ablate: run the sweep (or `cedm bound`) first")
    _stage(["cluster", *common, "--method", "temi", "--clusters", str(c_gamma), "--ablation", "gamma1"])
    v = verdict(run_dir, method)
    c_v = v["c_v"] if v["c_v"] is not None else v["best_c"]   # none beats uncond: the lowest FD all the same
    if c_v is not None:
        tag = f"{method}-C{c_v}"
        _stage(["sample", *common, "--cond", tag, "--num", str(sets * num), "--ablation", "uniform"])
        _stage(["evaluate", *common, "--cond", tag, "--ablation", "uniform",
                *_eval_flags(metric, sets, num, weights)])
    else:
        print(f"cedm ablations: no {method}-C<C> model evaluated yet: only the gamma = 1 clustering", file=sys.stderr)
    return {"c_gamma": c_gamma, "c_v": c_v}


def _add_sweep_flags(p, dataset_required: bool) -> None:
    from cedm.config import PRESETS
    from cedm.evaluate import METRICS

    if dataset_required:
        p.add_argument("--dataset", required=True, choices=(*PRESETS, "folder"),
                       help="dataset preset; 'folder' takes an image folder or zip from --source")
        p.add_argument("--source", default=None, metavar="PATH_OR_URL",
                       help="dataset archive, folder or zip (default: the official download for CIFAR)")
        p.add_argument("--resolution", type=int, default=None, metavar="N",
                       help="image resolution of the data stage (`cedm data --resolution`; default: the "
                            "preset's, for folder the images' own when they all agree)")
    p.add_argument("--clusters", default=None, metavar="LIST",
                   help="comma-separated C's to cluster (default: the preset's list)")
    p.add_argument("--candidates", default=None, metavar="LIST",
                   help="comma-separated C's to train C-EDM for; only those <= C_max are used, each "
                        "must be in the cluster list (default: the preset's list)")
    p.add_argument("--method", default="temi", choices=("temi", "kmeans", "skmeans"), help="clustering (default: %(default)s)")
    p.add_argument("--metric", default=None, choices=METRICS,
                   help="generative metric that picks C_V (default: the dataset preset's: classifier for "
                        "digits, else fid; fid falls back to the backbone's Fréchet distance, labelled, when "
                        "weights are missing; classifier: the FD in the features of a classifier trained on "
                        "the labelled training set, not FID)")
    p.add_argument("--mimg", type=float, default=None, help="training budget per model in Mimg (default: preset)")
    p.add_argument("--num", type=int, default=None, help="images per evaluation sample set (default: preset)")
    p.add_argument("--sets", type=int, default=None, help="evaluation sample sets (default: preset)")
    p.add_argument("--snapshot-every-mimg", type=float, default=None, metavar="M",
                   help="keep EMA snapshots every M Mimg while training and plot FD against training "
                        "Mimg per conditioning with the sample efficiency (`cedm curve`) (default: off)")
    p.add_argument("--ablations", action="store_true",
                   help="also run the paper's ablations as report rows: Table 4, C_V's model sampled with "
                        "uniform labels instead of q(c); Table 5, TEMI with gamma = 1 at C_max (its C^u)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="on a CPU, train up to N models at once, each a process with its share of the threads "
                        "(default: one per thread; 1: one after another with all threads)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the unconditional and ground-truth-label models")
    p.add_argument("--clip-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="also train on zero-shot CLIP pseudo-labels (labels:clip, the paper's Table 2; `cedm "
                        "clip-labels`) (default: the preset's: on for cifar100, off otherwise)")
    p.add_argument("--clip-weights", default=None, metavar="FILE",
                   help="OpenCLIP weights for --clip-labels (default: the hub cache)")
    p.add_argument("--inception-weights", default=None, metavar="FILE", help="Inception-v3 weights for FID")
    p.add_argument("--dinov2-weights", default=None, metavar="FILE", help="DINOv2 ViT-L/14 weights for FDD")


def register(sub) -> None:
    from cedm.pipeline import add_common

    p = sub.add_parser(
        "sweep", help="the whole method for a list of C: cluster, bound, train, sample, evaluate, report",
        description="Run every stage for one dataset: cluster for each C, search C_max, train C-EDM for "
                    "the candidate C <= C_max (plus unconditional and label baselines), sample, evaluate, "
                    "pick C_V by FID/FDD and say where it lies relative to C_max, then write the report. "
                    "Finished stages are skipped, so a killed sweep continues where it stopped.")
    add_common(p, starts_run=True)
    _add_sweep_flags(p, dataset_required=True)
    p.set_defaults(func=lambda a: _sweep_main(a, a.dataset, a.source))

    from cedm.evaluate import METRICS

    a = sub.add_parser(
        "ablations", help="the paper's Tables 4 and 5 for a finished sweep, as rows of its report",
        description="For a run directory whose sweep has finished: TEMI with gamma = 1 at C_max (Table 5; "
                    "cluster/temi-C<C_max>@gamma1) and C_V's model sampled with uniform labels instead of "
                    "q(c), scored like the others (Table 4; eval/<method>-C<C_V>@uniform). What `cedm sweep "
                    "--ablations` runs at its end, and the Argo sweep's ablations step. Run `cedm report` "
                    "afterwards.")
    add_common(a)
    a.add_argument("--method", default="temi", choices=("temi", "kmeans", "skmeans"),
                   help="the clustering of the sweep's C-EDM models (default: %(default)s)")
    a.add_argument("--metric", default=None, choices=METRICS,
                   help="as the sweep's evaluation (default: the dataset preset's: classifier for digits, else fid)")
    a.add_argument("--num", type=int, default=None, help="images per evaluation sample set (default: preset)")
    a.add_argument("--sets", type=int, default=None, help="evaluation sample sets (default: preset)")
    a.add_argument("--inception-weights", default=None, metavar="FILE", help="Inception-v3 weights for FID")
    a.add_argument("--dinov2-weights", default=None, metavar="FILE", help="DINOv2 ViT-L/14 weights for FDD")
    a.set_defaults(func=_ablations_main)

    from cedm.config import REPRODUCTION as R

    r = sub.add_parser(
        "run", help="the built-in default: the whole pipeline on digits in a few minutes on a CPU",
        description="The built-in default: `cedm sweep --dataset digits` with the pixels backbone and "
                    "the tiny generator (scikit-learn's digits ship with the package, nothing is "
                    "downloaded). Ends with a report at <run-dir>/report/report.html. With --reproduce, "
                    "the paper's sample-efficiency experiment at this scale (under an hour on a 2-core CPU).")
    add_common(r, starts_run=True)
    r.set_defaults(run_dir=None)
    next(a for a in r._actions if a.dest == "run_dir").help = (
        f"run directory (default: runs/digits; with --reproduce {R.run_dir})")
    _add_sweep_flags(r, dataset_required=False)
    r.add_argument("--reproduce", action="store_true",
                   help=f"the sample-efficiency experiment (the paper's Figs. 2 and 9) on digits: every "
                        f"model trained {R.mimg:g} Mimg with snapshots every {R.snapshot_every_mimg:g}, "
                        f"FD against Mimg in a digits classifier's features (not FID), the ratio in the "
                        f"report; run dir {R.run_dir} (the flags above still win)")
    r.set_defaults(func=_run_main)


def _ablations_main(args) -> None:
    from cedm.config import run_preset

    pre = run_preset(args.run_dir)
    common = _common_flags(args.run_dir, args.seed, args.device, args.force, args.pushgateway)
    with telemetry.stage("ablations", args.pushgateway):
        run_ablations(args.run_dir, common, args.method, args.metric or pre.metric, args.sets or pre.fid_sets,
                      args.num or pre.fid_samples, _weight_flags(args.inception_weights, args.dinov2_weights))


def _run_main(args) -> None:
    from cedm.config import REPRODUCTION as R

    if args.reproduce:
        for k in ("run_dir", "mimg", "snapshot_every_mimg"):
            if getattr(args, k) is None:
                setattr(args, k, getattr(R, k))
    if args.run_dir is None:
        args.run_dir = "runs/digits"
    _sweep_main(args, "digits", None)


def _sweep_main(args, dataset, source) -> None:
    with telemetry.stage("sweep", args.pushgateway):
        sweep(args.run_dir, dataset, source, int_list(args.clusters, "--clusters"),
              int_list(args.candidates, "--candidates"), args.method, args.metric, args.mimg, args.num,
              args.sets, not args.no_baselines, args.seed, args.device, args.force,
              args.inception_weights, args.dinov2_weights, args.pushgateway, args.snapshot_every_mimg,
              args.ablations, args.clip_labels, args.clip_weights, getattr(args, "resolution", None), args.jobs)


def _child(argv: list[str]) -> int:
    """`python -m cedm.sweep --threads T STAGE ...`: one stage as the sweep runs it (train_all's
    processes), with T torch threads; exit 2 with the sweep's message on a user error."""
    from cedm import threads
    from cedm.cli import exit_code

    threads.configure(int(argv[1]))
    return exit_code("sweep", lambda: _stage(argv[2:]))


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
