"""`cedm guidance`: the guidance sweep of one conditioning (docs/method.md#guidance-sweep).

For a trained model it samples the same seeds under a grid of settings -- unguided,
classifier-free guidance (CFG) and autoguidance from a worse version of the model (an earlier
EMA snapshot or another model of the same labels), each over guidance weights w and over the
full sigma range or a guidance interval (lo, hi] -- and, with --oversample K, confidence-filtered
sampling on top of the unguided and of the best guided setting. Every setting is scored like
`cedm evaluate` (the run's metric, the same reference statistics) on `sets` sets of `num`
images: set j is the images of seeds j num .. (j + 1) num - 1 for every setting, so a setting's
difference to unguided is also given per set (paired: the same noise and labels). Writes
guidance/<cond>/sweep.json: every setting's FDs, the best setting, the set-to-set noise.

`c_v_choice` picks C_V from these sweeps twice with plan.pick_c_v: at each C's unguided FD
(the paper's protocol) and at each C's best setting.

Each setting's score is kept in the stage's folder as it is made (settings/<key>.json, keyed by
the setting, the scoring and the inputs' hashes), so a killed sweep resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from cedm import pipeline
from cedm.io import CedmError, RunDir, load_json, save_json

METHODS = {"cfg": "classifier-free guidance (against the null label)",
           "auto": "autoguidance (against a worse version of the model, --guide)"}
WEIGHTS = (0.1, 0.3, 1.0)                 # w: D = (1+w) D(x|c) - w D_ref (cedm.sample.guided_denoiser)
INTERVALS = ("0.28,5.42",)                       # Kynkaanniemi et al.'s EDM2-S interval
GUIDE_FRACTION = 0.25                            # default guide: the snapshot nearest this share of training
PROTOCOL = ("the paper picks C_V by the generator's FID without guidance (guidance is an option of "
            "its sampler, not of its C_V search): c_v_unguided")


def guidance_dir(run_dir, cond: str) -> Path:
    """guidance/<cond>/ of a run (folder named as the other per-conditioning stages)."""
    from cedm.conditioning import folder

    return RunDir(run_dir).root / "guidance" / folder(cond)


def setting_name(s: dict) -> str:
    """A short, unique, readable name: 'unguided', 'cfg w=1', 'cfg w=1 (0.28,5.42]',
    'auto[snapshot:0.05] w=1', with ' +msp x4' for a filtered one."""
    if s["method"] == "none":
        name = "unguided"
    else:
        name = s["method"] + (f"[{s['guide']}]" if s.get("guide") else "") + f" w={s['guidance']:g}"
        if s.get("interval"):
            name += f" ({s['interval'][0]:g},{s['interval'][1]:g}]"
    if s.get("filter"):
        name += f" +{s['filter']} x{s['oversample']}"
    return name


def _setting(method: str, w: float = 0.0, interval=None, guide=None, oversample: int = 1, filter=None) -> dict:
    s = {"method": method, "guidance": float(w), "interval": list(interval) if interval else None,
         "guide": guide, "oversample": int(oversample), "filter": filter}
    return {"name": setting_name(s), **s}


def default_guide(tdir, meta: dict) -> str | None:
    """snapshot:M of the snapshot nearest GUIDE_FRACTION of the training (None without snapshots)."""
    from cedm.checkpoint import snapshots

    snaps = [n for n, _ in snapshots(tdir) if n < int(meta.get("nimg", 0))]
    if not snaps:
        return None
    n = min(snaps, key=lambda v: abs(v - GUIDE_FRACTION * meta["nimg"]))
    return f"snapshot:{n / 1e6:g}"


def grid(meta: dict, methods, weights, intervals, guides) -> list[dict]:
    """The guided settings (the unguided one is always scored first): each method x guide x w x
    (the full range and each interval)."""
    out = []
    for m in methods:
        for g in (guides if m == "auto" else [None]):
            for w in weights:
                for iv in [None, *intervals]:
                    out.append(_setting(m, w, iv, g))
    return out


def _check(meta: dict, methods, weights, guides, oversample: int, filter) -> None:
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise CedmError(f"unknown --methods {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if not methods:
        raise CedmError(f"nothing to sweep: {meta['tag']} was trained without label dropout (no CFG: "
                        f"`cedm train --p-uncond 0.1`) and kept no snapshots to guide with (no autoguidance: "
                        f"`cedm train --snapshot-every-mimg M`, or --guide MODEL)")
    if "cfg" in methods and not (meta.get("p_uncond") and meta.get("label_dim")):
        raise CedmError(f"--methods cfg: {meta['tag']} "
                        + ("is unconditional" if not meta.get("label_dim") else "was trained without label dropout "
                           f"(p_uncond 0); retrain with `cedm train --cond {meta['tag']} --p-uncond 0.1 --force`")
                        + "; use --methods auto")
    if "auto" in methods and not guides:
        raise CedmError(f"--methods auto needs --guide (snapshot:M or a model directory); {meta['tag']} kept no "
                        f"snapshots to pick one from")
    if not weights or any(not w > 0 for w in weights):
        raise CedmError(f"--guidance-weights must be > 0 (the unguided setting is always scored), got {weights}")
    from cedm.sample import check_oversample

    check_oversample(oversample, filter if oversample != 1 else None)


def _floats(text, flag: str) -> list[float]:
    if text is None or isinstance(text, (list, tuple)):
        return [float(v) for v in text] if text is not None else []
    try:
        return [float(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise CedmError(f"{flag} must be a comma-separated list of numbers (got {text!r})") from None


def _key(setting: dict, scoring: dict) -> str:
    blob = json.dumps({"setting": {k: v for k, v in setting.items() if k != "name"}, **scoring}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _paired(values, base) -> dict:
    d = np.asarray(values) - np.asarray(base)
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0}


def summarise(settings: list[dict]) -> dict:
    """The sweep's verdict from its scored settings (the first is unguided): the best setting by
    mean FD, its paired difference to unguided, whether that difference exceeds its own spread,
    and the set-to-set noise (the unguided sets' standard deviation)."""
    base = settings[0]
    best = min(settings, key=lambda s: s["mean"])
    out = {"unguided": {k: base[k] for k in ("name", "values", "mean", "std")},
           "best": {k: best[k] for k in ("name", "method", "guidance", "interval", "guide", "oversample",
                                         "filter", "values", "mean", "std", "vs_unguided")},
           "noise": base["std"]}
    d = best["vs_unguided"]
    beyond = d["mean"] < 0 and abs(d["mean"]) > 2 * d["std"] / max(np.sqrt(len(base["values"])), 1)
    out["verdict"] = (f"best {best['name']}: {best['mean']:.3f} ± {best['std']:.3f} against unguided "
                      f"{base['mean']:.3f} ± {base['std']:.3f} (paired difference {d['mean']:+.3f} ± {d['std']:.3f} "
                      f"over {len(base['values'])} sets"
                      + ("" if best is base else ("; beyond the noise" if beyond else "; within the noise")) + ")")
    out["best"]["beyond_noise"] = bool(beyond) if best is not base else False
    return out


def run(run_dir, cond: str, weights=None, intervals=None, guides=None, methods=None, oversample: int = 1,
        filter: str | None = "msp", metric: str | None = None, sets: int | None = None, num: int | None = None,
        steps: int | None = None, precision: str | None = None, batch_size: int | None = None, device=None,
        force: bool = False, pushgateway=None, inception_weights=None, dinov2_weights=None) -> dict:
    """Sweep the guidance settings of train/<cond> into guidance/<cond>/sweep.json (see the module)."""
    from cedm import evaluate, sample
    from cedm.conditioning import cluster_of, parse_tag
    from cedm.config import run_preset

    cond = str(parse_tag(cond))
    rd = RunDir(run_dir)
    device = pipeline.resolve_device(device)
    pre = run_preset(run_dir)
    metric = pre.metric if metric is None else metric
    sets = int(pre.fid_sets if sets is None else sets)
    num = int(pre.fid_samples if num is None else num)
    if sets < 2 or num < 2:
        raise CedmError(f"need --sets >= 2 (the set-to-set noise) and --num >= 2 (got {sets}, {num})")
    tdir = rd.train(cond)
    if not (tdir / "manifest.json").exists():
        raise CedmError(f"{tdir} holds no finished training run; run `cedm train --run-dir {run_dir} --cond {cond}` "
                        f"(with --p-uncond 0.1 for CFG, --snapshot-every-mimg M for autoguidance) first")
    net, meta = sample.load_network(tdir, device)
    weights = sorted(set(_floats(weights, "--guidance-weights"))) if weights is not None else list(WEIGHTS)
    intervals = [iv for v in (INTERVALS if intervals is None else intervals) if (iv := sample.parse_interval(v))]
    guides = list(guides) if guides else [g for g in [default_guide(tdir, meta)] if g]
    if methods is None:
        methods = [m for m, ok in (("cfg", meta.get("p_uncond") and meta.get("label_dim")), ("auto", guides)) if ok]
    methods = list(methods)
    _check(meta, methods, weights, guides, oversample, filter)
    steps = sample.sampler_steps(meta, steps)
    precision = sample.resolve_precision(meta, device, precision)
    loaded = {g: sample.load_guide(g, tdir, meta, device) for g in (guides if "auto" in methods else [])}
    scorer = sample.confidence_scorer(run_dir, meta, device) if oversample > 1 else None
    out = guidance_dir(run_dir, cond)
    config = {"cond": cond, "metric": metric, "sets": sets, "num": num, "steps": steps, "precision": precision,
              "methods": methods, "weights": weights, "intervals": [list(i) for i in intervals],
              "guides": [{"spec": g, "guide": i["guide"], "nimg": i["nimg"]} for g, (_, i) in loaded.items()],
              "oversample": int(oversample), "filter": filter if oversample > 1 else None, "seed_base": 0,
              "ref_seed": evaluate.REF_SEED,
              "inception_weights": str(inception_weights) if inception_weights else None,
              "dinov2_weights": str(dinov2_weights) if dinov2_weights else None}
    cl = cluster_of(cond)
    inputs = [tdir, rd.data] + [f for _, (_, i) in loaded.items() for f in i["files"]]
    inputs += [d for d in (rd.features, *([rd.cluster(*cl)] if cl else [])) if (d / "manifest.json").exists()]
    batch_size = sample._batch_size(batch_size, device)
    kw = dict(steps=steps, batch_size=batch_size, device=device, progress=False, precision=precision)

    def compute(work: Path, d: pipeline.Decision):
        from tqdm.auto import tqdm

        key, label, extractor, fallback = evaluate.choose_extractor(run_dir, metric, device, inception_weights,
                                                                    dinov2_weights)
        ref = evaluate.reference_statistics(run_dir, key, extractor, evaluate.reference_cap(key))
        scoring = {"metric": key, "sets": sets, "num": num, "steps": steps, "precision": precision,
                   "inputs": d.inputs, "ref": ref["n"]}
        judge = getattr(extractor, "predict", None) if meta.get("kind") == "labels" and not meta.get("method") else None

        def score(s: dict) -> dict:
            cache = work / "settings" / f"{_key(s, scoring)}.json"
            if cache.exists():                       # made by a killed run of the same sweep
                return load_json(cache)
            gkw = dict(kw, guidance=s["guidance"], guidance_interval=s["interval"],
                       guide=loaded[s["guide"]][0] if s["guide"] else None)
            if s["filter"]:
                parts = [sample.generate_filtered(net, meta, num, scorer, s["oversample"], s["filter"],
                                                  seed_base=j * num, **gkw) for j in range(sets)]
                res = {k: np.concatenate([p[k] for p in parts]) for k in ("images", "clusters", "scores", "plain_scores")}
            else:
                res = sample.generate(net, meta, sets * num, seed_base=0, **gkw)
            feats = extractor(res["images"])
            r = {**s, **evaluate.set_distances(feats, ref, sets, num)}
            if judge is not None:                    # labels: how often the judge names the asked class
                r["recognised"] = float((judge(res["images"]) == res["clusters"]).mean())
            if s["filter"]:
                r["score_kept_mean"] = float(res["scores"].mean())     # the filter's score: kept and plain draw
                r["score_plain_mean"] = float(res["plain_scores"].mean())
            save_json(cache, r)
            return r

        todo = [_setting("none"), *grid(meta, methods, weights, intervals, guides)]
        bar = tqdm(total=len(todo) + (2 if oversample > 1 else 0), desc=f"guidance {cond}", unit="setting",
                   disable=None, file=sys.stderr)
        scored = []
        for s in todo:
            scored.append(score(s))
            bar.update()
        if oversample > 1:       # filtering on top of unguided and of the best guided setting
            best = min(scored[1:], key=lambda r: r["mean"]) if len(scored) > 1 else None
            for s in [scored[0]] + ([best] if best is not None and best["mean"] < scored[0]["mean"] else []):
                scored.append(score(_setting(s["method"], s["guidance"], s["interval"], s["guide"],
                                             oversample, filter)))
                bar.update()
        bar.close()
        for r in scored:
            r["vs_unguided"] = _paired(r["values"], scored[0]["values"])
        result = {"cond": cond, "metric": key, "label": label, "sets": sets, "num": num, "steps": steps,
                  "ref_images": ref["n"], "settings": scored, **summarise(scored),
                  **({"fallback_reason": fallback} if fallback else {})}
        save_json(work / "sweep.json", result)
        return pipeline.Output({"sweep": "sweep.json", "settings": "settings/"}, value=result)

    res = pipeline.execute(pipeline.Stage("guidance", out, rd.root, config, inputs, resumable=True, seed_redo=True),
                           compute, force=force, pushgateway=pushgateway, quiet=True, labels={"cond": cond})
    return load_json(out / "sweep.json") if res.skipped else res.value


# ----------------------------------------------------------------------------------------------
# The sweeps of a run, and C_V from them

def results(run_dir) -> dict[str, dict]:
    """{cond: sweep.json} of every finished guidance sweep of the run."""
    root = RunDir(run_dir).root / "guidance"
    if not root.is_dir():
        return {}
    return {load_json(d / "sweep.json")["cond"]: load_json(d / "sweep.json")
            for d in sorted(root.iterdir()) if (d / "manifest.json").exists() and (d / "sweep.json").exists()}


def _choose(metrics: dict[str, dict], method: str, c_max) -> tuple[int | None, str]:
    """plan.verdict's rule on {cond: {"values", "mean", "std"}}: C_V is the '<method>-C<C>' with the
    lowest FD among those that beat the unconditional model (plan.versus), or, without an
    unconditional entry, the lowest FD. Returns (C_V or None, the case)."""
    from cedm.plan import pick_c_v, versus

    best_c, _ = pick_c_v(metrics, method, c_max)
    base = metrics.get("uncond")
    if best_c is None:
        return None, "no model"
    if base is None:
        return best_c, "no baseline"
    beating = {c: m for c, m in metrics.items() if c != "uncond" and versus(m, base)["outcome"] == "beats"}
    c_v, _ = pick_c_v(beating, method, c_max)
    return c_v, "beats" if c_v is not None else "none beats"


def c_v_choice(run_dir, method: str = "temi") -> dict:
    """C_V from the guidance sweeps, by plan.verdict's rule (_choose): once at every model's
    unguided FD (the paper's protocol), once at every model's best setting (the unconditional
    model's best too: autoguidance applies to it). {} without a sweep of a '<method>-C<C>'."""
    res = results(run_dir)
    table = RunDir(run_dir).bound / "table.json"
    c_max = load_json(table).get("c_max") if table.exists() else None
    unguided = {c: r["unguided"] for c, r in res.items()}
    best = {c: r["best"] for c, r in res.items()}
    c_u, case_u = _choose(unguided, method, c_max)
    c_g, case_g = _choose(best, method, c_max)
    if case_u == "no model":
        return {}
    tag = lambda c: f"{method}-C{c}"          # noqa: E731
    return {"protocol": PROTOCOL, "c_v_unguided": c_u, "case_unguided": case_u,
            "fd_unguided": unguided[tag(c_u)]["mean"] if c_u else None,
            "c_v_guided": c_g, "case_guided": case_g, "fd_guided": best[tag(c_g)]["mean"] if c_g else None,
            "setting_guided": best[tag(c_g)]["name"] if c_g else None,
            "best": {c: {"name": b["name"], "mean": b["mean"], "std": b["std"]} for c, b in best.items()}}


def report_lines(run_dir, method: str = "temi") -> list[str]:
    """The report's lines: each conditioning's sweep verdict, then C_V both ways."""
    from cedm.conditioning import sort_key

    res = results(run_dir)
    out = [f"{c}: {res[c]['verdict']}" for c in sorted(res, key=sort_key)]
    v = c_v_choice(run_dir, method)
    if v:
        say = lambda c, case: f"C_V = {c}" if c is not None else f"no C_V ({case})"     # noqa: E731
        out.append(f"{say(v['c_v_unguided'], v['case_unguided'])} unguided (the paper's protocol); "
                   f"{say(v['c_v_guided'], v['case_guided'])} at each model's best setting"
                   + (f" ({v['setting_guided']})" if v["setting_guided"] else ""))
    return out


def register(sub) -> None:
    from cedm.evaluate import METRICS
    from cedm.sample import FILTERS, PRECISIONS

    p = sub.add_parser(
        "guidance", help="sweep guidance settings of a trained model, scored by the run's metric",
        description="Sample the same seeds under a grid of guidance settings (unguided; classifier-free "
                    "guidance; autoguidance from an earlier snapshot or another model of the same labels; each "
                    "over --guidance-weights and over the full noise range and each --guidance-interval) and, with --oversample, "
                    "confidence filtering on top of the unguided and the best setting. Each setting is scored "
                    "like `cedm evaluate` on --sets sets of --num images (set j: seeds j num .. (j+1) num - 1, "
                    "the same for every setting, so differences are paired). Writes guidance/<cond>/sweep.json "
                    "with the best setting and the set-to-set noise; the report plots FD against w. A killed "
                    "sweep resumes. docs/method.md#guidance-sweep")
    pipeline.add_common(p)
    p.add_argument("--cond", required=True, metavar="TAG", help="conditioning of the trained model")
    p.add_argument("--methods", default=None, metavar="LIST",
                   help="comma list of cfg, auto (default: cfg where the model was trained with label dropout, "
                        "auto where it kept snapshots or --guide is given)")
    p.add_argument("--guidance-weights", default=None, metavar="LIST",
                   help=f"guidance weights w > 0, D = (1+w) D(x|c) - w D_ref, as `cedm sample --guidance` "
                        f"(default: {','.join(map(str, WEIGHTS))})")
    p.add_argument("--guidance-interval", dest="intervals", action="append", default=None, metavar="LO,HI",
                   help=f"a guidance interval (LO, HI] swept beside the full range; repeat for several; '' for the "
                        f"full range only (default: {' '.join(INTERVALS)}, Kynkaanniemi et al.'s EDM2-S setting)")
    p.add_argument("--guide", dest="guides", action="append", default=None, metavar="SNAPSHOT|MODEL",
                   help="autoguidance guide, as `cedm sample --guide`; repeat for several (default: the snapshot "
                        f"nearest {GUIDE_FRACTION:g} of the training)")
    p.add_argument("--oversample", type=int, default=1, metavar="K",
                   help="also score confidence filtering (`cedm sample --oversample K --filter F`) on the unguided "
                        "and the best guided setting (default: 1, off)")
    p.add_argument("--filter", choices=tuple(FILTERS), default="msp", help="the filter's score (default: %(default)s)")
    p.add_argument("--metric", default=None, choices=METRICS, help="as `cedm evaluate --metric` (default: the preset's)")
    p.add_argument("--sets", type=int, default=None, help="sample sets per setting, >= 2 (default: the preset's)")
    p.add_argument("--num", type=int, default=None, help="images per set (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps N (default: by resolution, as `cedm sample`)")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="as `cedm sample --precision`")
    p.add_argument("--batch-size", type=int, default=None, help="images per network batch (default: as `cedm sample`)")
    p.add_argument("--inception-weights", default=None, metavar="FILE", help="Inception-v3 weights for FID")
    p.add_argument("--dinov2-weights", default=None, metavar="FILE", help="DINOv2 ViT-L/14 weights for FDD")

    def _main(args):
        methods = [m for m in args.methods.replace(" ", "").split(",") if m] if args.methods else None
        with pipeline.reporting("guidance", args.pushgateway, run_dir=args.run_dir, cond=args.cond):
            r = run(args.run_dir, args.cond, args.guidance_weights, args.intervals, args.guides, methods, args.oversample,
                    args.filter, args.metric, args.sets, args.num, args.steps, args.precision, args.batch_size,
                    args.device, args.force, inception_weights=args.inception_weights,
                    dinov2_weights=args.dinov2_weights)
        print(f"{r['cond']}: {r['label']}: {r['verdict']}")

    p.set_defaults(func=_main)
