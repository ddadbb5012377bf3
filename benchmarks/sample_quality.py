"""What bf16 sampling costs in quality, against fp32 with the same seeds (not a test, not part of
`make bench`; docs/performance.md, "Sampling in bf16: the cost in quality").

    python -m benchmarks.sample_quality --run-dir runs/digits --cond labels [--num 500]

Samples the trained model of `--cond` four times with cedm.sample.generate: seeds 0..num-1 in
fp32 and in bf16 (sets A), seeds num..2num-1 in fp32 and in bf16 (sets B), and reports

- the classifier-feature Fréchet distance (`cedm evaluate --metric classifier`'s features,
  cedm.judge) of each set to the training images, and between sets: bf16 vs fp32 of the same
  seeds, against fp32 vs fp32 of other seeds (the set-to-set noise a precision change must stay
  within);
- the 1-NN AUROC (cedm.evaluate.one_nn_auroc, in the clustering backbone's features, as
  `cedm evaluate`) of bf16 samples against fp32 samples of the same seeds, and of fp32 seeds B
  against fp32 seeds A (0.5: indistinguishable by their distance to the training set), and of
  each against the held-out images as `cedm evaluate` reports it;
- the PSNR (peak 255) of each bf16 image against the fp32 image of its seed, and the same for
  images of different seeds (the scale of "different").

Prints one JSON object; --out also writes it (atomically).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images [N,H,W,C] (inf where identical)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


def _summary(p: np.ndarray) -> dict:
    finite = p[np.isfinite(p)]
    return {"mean_db": float(finite.mean()) if len(finite) else None,
            "median_db": float(np.median(p)), "min_db": float(p.min()),
            "identical": int((~np.isfinite(p)).sum()), "n": int(len(p))}


def measure(run_dir, cond: str = "labels", num: int | None = None, device: str = "cpu",
            batch_size: int = 128) -> dict:
    from cedm import evaluate, sample
    from cedm.config import run_preset
    from cedm.io import RunDir, load_array

    rd = RunDir(run_dir)
    num = int(run_preset(run_dir).fid_samples if num is None else num)
    net, meta = sample.load_network(rd.train(cond), device)
    sets = {}
    for name, base in (("A", 0), ("B", num)):
        for prec in ("fp32", "bf16"):
            print(f"sampling {cond} seeds {base}..{base + num - 1} in {prec}", file=sys.stderr)
            sets[f"{name}_{prec}"] = sample.generate(net, meta, num, seed_base=base, batch_size=batch_size,
                                                     device=device, progress=False, precision=prec)
    for name in ("A", "B"):
        if not np.array_equal(sets[f"{name}_fp32"]["labels"], sets[f"{name}_bf16"]["labels"]):
            raise SystemExit("labels differ between precisions for the same seeds (they must not)")
    images = {k: v["images"] for k, v in sets.items()}

    key, label, extractor, _ = evaluate.choose_extractor(run_dir, "classifier", device)
    ref = evaluate.reference_statistics(run_dir, key, extractor, evaluate.reference_cap(key))
    feats = {k: extractor(v) for k, v in images.items()}
    stats = {k: evaluate.feature_statistics(v) for k, v in feats.items()}
    fd = evaluate.frechet_distance
    out = {"run_dir": str(run_dir), "cond": cond, "num": num, "network": meta.get("network"),
           "nimg": meta.get("nimg"), "metric": label,
           "fd_to_training": {k: fd(s, ref) for k, s in stats.items()},
           "fd_between": {"bf16 vs fp32, same seeds (A)": fd(stats["A_bf16"], stats["A_fp32"]),
                          "bf16 vs fp32, same seeds (B)": fd(stats["B_bf16"], stats["B_fp32"]),
                          "fp32 B vs fp32 A, other seeds (noise)": fd(stats["B_fp32"], stats["A_fp32"]),
                          "bf16 B vs bf16 A, other seeds (noise)": fd(stats["B_bf16"], stats["A_bf16"])}}
    out["fd_to_training_noise"] = {"fp32 |A - B|": abs(out["fd_to_training"]["A_fp32"] - out["fd_to_training"]["B_fp32"]),
                                   "bf16 - fp32, A": out["fd_to_training"]["A_bf16"] - out["fd_to_training"]["A_fp32"],
                                   "bf16 - fp32, B": out["fd_to_training"]["B_bf16"] - out["fd_to_training"]["B_fp32"]}

    bb = evaluate.backbone_extractor(run_dir, device)
    train_feats = load_array(rd.features / "features.npy")
    bbf = {k: bb(v) for k, v in images.items()}
    auc = evaluate.one_nn_auroc
    out["auroc_1nn"] = {"bf16 vs fp32, same seeds (A)": auc(train_feats, bbf["A_bf16"], bbf["A_fp32"]),
                        "bf16 vs fp32, same seeds (B)": auc(train_feats, bbf["B_bf16"], bbf["B_fp32"]),
                        "fp32 B vs fp32 A, other seeds (noise)": auc(train_feats, bbf["B_fp32"], bbf["A_fp32"])}
    test_file = rd.data / "test_images.npy"
    if test_file.exists():
        held = bb(np.asarray(load_array(test_file, mmap=True)[:num]))
        out["auroc_1nn_vs_heldout"] = {k: auc(train_feats, v, held) for k, v in bbf.items()}
        out["auroc_heldout_images"] = int(len(held))

    out["psnr_bf16_vs_fp32_same_seed"] = _summary(np.concatenate([psnr(images["A_bf16"], images["A_fp32"]),
                                                                  psnr(images["B_bf16"], images["B_fp32"])]))
    out["psnr_fp32_other_seed"] = _summary(psnr(images["A_fp32"], images["B_fp32"]))
    diff = np.abs(images["A_bf16"].astype(int) - images["A_fp32"].astype(int))
    out["abs_diff_bf16_vs_fp32_A"] = {"mean": float(diff.mean()), "max": int(diff.max()),
                                      "pixels_changed": float((diff > 0).mean())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sample_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a run directory with train/<cond> (e.g. `cedm run`'s)")
    ap.add_argument("--cond", default="labels", help="the trained model to sample (default: %(default)s)")
    ap.add_argument("--num", type=int, default=None, help="images per set (default: the preset's FID samples)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    from cedm.io import CedmError, save_json

    try:
        res = measure(args.run_dir, args.cond, args.num, args.device)
    except CedmError as e:
        print(f"sample_quality: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    if args.out:
        save_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
