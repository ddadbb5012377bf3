"""`cedm curve`: Fréchet distance against training Mimg, and the sample efficiency read from it
(the paper's Figs. 2 and 9; docs/method.md#sample-efficiency).

A model trained with `cedm train --snapshot-every-mimg M` keeps its EMA weights every M Mimg
(train/<tag>/snapshots/). This stage samples `num` images from each snapshot (seeds 0..num-1,
the sampler's defaults, labels from q(c); the precision `cedm sample` picks on this device, or
--precision, recorded in the config) and scores them with the evaluation's feature
extractor against the same reference statistics as `cedm evaluate` (FID, FDD, the clustering
backbone's FD or the classifier judge), into curve/<tag>/curve.json.

Sample efficiency (the paper's claim that C-EDM at 40 Mimg beats unconditional EDM at 200 Mimg):
with the unconditional model's FD at its largest budget M_u as the target, a model that first
reaches that FD after m Mimg (linear interpolation between snapshots) is M_u / m times as
sample-efficient; a model that never reaches it within its budget has no ratio.
"""
from __future__ import annotations

import sys

from cedm import pipeline
from cedm.checkpoint import snapshots
from cedm.io import CedmError, RunDir, load_json, load_tensors, save_json


def mimg_to_reach(points: list[dict], target: float) -> float | None:
    """The first training Mimg at which a curve [{"mimg", "fd"}] (by mimg) reaches FD <= target,
    linearly interpolated between snapshots; None when it never does."""
    prev = None
    for p in sorted(points, key=lambda q: q["mimg"]):
        if p["fd"] <= target:
            if prev is None or prev["fd"] == p["fd"]:
                return float(p["mimg"])
            t = (prev["fd"] - target) / (prev["fd"] - p["fd"])
            return float(prev["mimg"] + t * (p["mimg"] - prev["mimg"]))
        prev = p
    return None


def sample_efficiency(curves: dict[str, list[dict]], reference: str = "uncond") -> dict:
    """Per conditioning: the Mimg it needs to match the `reference` model's final FD, and the
    ratio reference budget / that Mimg (> 1: fewer training images for the same FD).

    Returns {"reference", "target_fd", "reference_mimg", "models": {cond: {"mimg", "ratio"}}},
    or {} when the reference curve is missing."""
    ref = curves.get(reference)
    if not ref:
        return {}
    last = max(ref, key=lambda q: q["mimg"])
    out = {"reference": reference, "target_fd": float(last["fd"]), "reference_mimg": float(last["mimg"]),
           "models": {}}
    for cond, pts in curves.items():
        if cond == reference or not pts:
            continue
        m = mimg_to_reach(pts, last["fd"])
        out["models"][cond] = {"mimg": m, "ratio": (last["mimg"] / m) if m else None,
                               "final_mimg": float(max(q["mimg"] for q in pts)),
                               "final_fd": float(max(pts, key=lambda q: q["mimg"])["fd"])}
    return out


def run(run_dir, cond: str, metric: str | None = None, num: int | None = None, inception_weights=None,
        dinov2_weights=None, device=None, force: bool = False, pushgateway=None,
        precision: str | None = None) -> dict:
    from cedm import evaluate, sample
    from cedm.conditioning import parse_tag
    from cedm.config import run_preset

    cond = str(parse_tag(cond))
    rd = RunDir(run_dir)
    device = pipeline.resolve_device(device)
    pre = run_preset(run_dir)
    num = int(pre.fid_samples if num is None else num)
    metric = pre.metric if metric is None else metric     # the dataset's judge (Preset.metric)
    if num < 2:
        raise CedmError(f"--num must be >= 2 (got {num})")
    tdir = rd.train(cond)
    if not (tdir / "manifest.json").exists():
        raise CedmError(f"{tdir} holds no finished training run; run `cedm train --run-dir {run_dir} "
                        f"--cond {cond} --snapshot-every-mimg M` first")
    snaps = snapshots(tdir)
    if not snaps:
        raise CedmError(f"{tdir} has no snapshots: train it with --snapshot-every-mimg M (and --force "
                        f"when it is already trained)")
    out = rd.curve(cond)
    # the sampling precision as `cedm sample` resolves it (the model's rule on this device)
    precision = sample.resolve_precision(load_json(tdir / "network.json"), device, precision)
    config = {"cond": cond, "metric": metric, "num": num, "seed_base": 0, "ref_seed": evaluate.REF_SEED,
              "snapshots": [n for n, _ in snaps],
              "inception_weights": str(inception_weights) if inception_weights else None,
              "dinov2_weights": str(dinov2_weights) if dinov2_weights else None, "precision": precision,
              **({"fdd_features": evaluate.FDD_FEATURES} if metric == "fdd" else {})}   # as evaluate's
    config = sample.legacy_config(out, config, force)   # curves made before it was recorded: fp32

    def compute(work, _):
        from tqdm.auto import tqdm

        key, label, extractor, fallback = evaluate.choose_extractor(run_dir, metric, device,
                                                                    inception_weights, dinov2_weights)
        ref = evaluate.reference_statistics(run_dir, key, extractor, evaluate.reference_cap(key))
        net, meta = sample.load_network(tdir, device)
        points = []
        for nimg, path in tqdm(snaps, desc=f"curve {cond}", unit="snapshot", disable=None, file=sys.stderr):
            net.load_state_dict({k: v.to(device) for k, v in load_tensors(path).items()}, strict=True)
            res = sample.generate(net, meta, num, seed_base=0, device=device, progress=False,
                                  batch_size=sample._batch_size(None, device), precision=precision)
            fd = evaluate.frechet_distance(evaluate.feature_statistics(extractor(res["images"])), ref)
            points.append({"mimg": nimg / 1e6, "fd": fd})
        result = {"cond": cond, "metric": key, "label": label, "num": num, "points": points,
                  "ref_images": ref["n"], **({"fallback_reason": fallback} if fallback else {})}
        save_json(work / "curve.json", result)
        return pipeline.Output({"curve": "curve.json"}, value=result)

    inputs = [tdir, rd.data] + ([rd.features] if (rd.features / "manifest.json").exists() else [])
    res = pipeline.execute(pipeline.Stage("curve", out, rd.root, config, inputs),
                           compute, force=force, pushgateway=pushgateway, quiet=True, labels={"cond": cond})
    return load_json(out / "curve.json") if res.skipped else res.value


def register(sub) -> None:
    from cedm.sample import PRECISIONS

    p = sub.add_parser(
        "curve", help="Fréchet distance against training Mimg, from a model's snapshots",
        description="Sample --num images from every snapshot a training run kept (cedm train "
                    "--snapshot-every-mimg) and score them like `cedm evaluate` (same metric, same "
                    "reference statistics): curve/<cond>/curve.json. The report plots the curves of "
                    "all conditionings and reads the sample efficiency from them (the training Mimg a "
                    "model needs to match the unconditional model's final FD; the paper's Figs. 2, 9).")
    pipeline.add_common(p)
    p.add_argument("--cond", required=True, metavar="TAG", help="conditioning: <method>-C<C>, labels or uncond")
    from cedm.evaluate import METRICS

    p.add_argument("--metric", default=None, choices=METRICS,
                   help="as `cedm evaluate --metric` (default: the dataset preset's: classifier for digits, else fid)")
    p.add_argument("--num", type=int, default=None, help="images per snapshot (default: the preset's "
                   "evaluation set size)")
    p.add_argument("--inception-weights", default=None, type=pipeline.optional, metavar="FILE", help="Inception-v3 weights for FID")
    p.add_argument("--dinov2-weights", default=None, type=pipeline.optional, metavar="FILE", help="DINOv2 ViT-L/14 weights for FDD")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the network's precision while sampling (default: as `cedm sample`, the model's "
                        "training rule on this device; see `cedm sample --help`)")

    def _main(args):
        with pipeline.reporting("curve", args.pushgateway, run_dir=args.run_dir, cond=args.cond):
            c = run(args.run_dir, args.cond, args.metric, args.num, args.inception_weights,
                    args.dinov2_weights, args.device, args.force, precision=args.precision)
        pts = ", ".join(f"{p['mimg']:.3g}: {p['fd']:.3f}" for p in c["points"])
        print(f"{c['cond']}: {c['label']} at Mimg {pts}")

    p.set_defaults(func=_main)
