"""`cedm clip-labels`: zero-shot CLIP pseudo-labels of the training images, conditionings of the
paper's Table 2 (tags `labels:clip` and, on CIFAR-100, `labels:clip-coarse`; docs/method.md#clip-labels).

As the authors' CLIP labelling code makes them (HHU-MMBS/plp-official-tmlr2024: eval/utils.py
clip_label_embeddings, linear_probing.py clip_pseudo_probs): each class name, as torchvision's
`.classes` spells it (the CIFAR meta files' names, underscores kept: aquarium_fish, maple_tree), is
put into the five prompt templates below; the text embeddings of the five prompts are
L2-normalised, averaged and normalised again. Each image, preprocessed by the CLIP model's own
evaluation transform, is embedded and normalised; its pseudo-label is the argmax over classes of
softmax(logit_scale * cos(image, class)). On CIFAR-100 the same image embeddings also get a
separate zero-shot over the 20 super-class names as PLP's CIFAR20 `.classes` spells them
(loaders/cifar20.py, in the order of CIFAR-100's coarse labels; the official C-EDM files'
`CLIP_pseudo_labels/superclasses_20`): Table 2's CLIP row at C = 20. The model is OpenCLIP's
(open_clip_torch), by default ViT-bigG-14 trained on LAION-2B (the paper's ViT-G/14): pretrained
weights from the Hugging Face hub cache, or a local file (--weights); missing weights are an
error, never a random init. --model-config registers another open_clip architecture from its JSON
config.

Writes <run>/clip/: labels.npy [N] int64 (class indices of data's class_names), on CIFAR-100 also
coarse_labels.npy [N] int64 (super-class indices), summary.json (model, templates, class names,
counts per class, and the agreement with data/labels.npy / coarse_labels.npy when the dataset has
them: the zero-shot accuracy; `coarse` for the super-classes), manifest.json (config + inputs:
the stage layer).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

from cedm import pipeline
from cedm.io import CedmError, RunDir, load_array, load_json, save_array, save_json

FOLDER = "clip"                                # <run>/clip/
DEFAULT_MODEL = "ViT-bigG-14"                  # OpenCLIP ViT-G/14 (the paper's Table 2)
DEFAULT_PRETRAINED = "laion2b_s39b_b160k"
TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of many {}.",
             "a photo of the large {}.", "a photo of the small {}.")
DEFAULT_BATCH = 64
# PLP's CIFAR20 `.classes` (plp-official-tmlr2024 loaders/cifar20.py, after SCAN), the names of its
# CIFAR-100 super-class zero-shot, verbatim ("househould" too: the same text gives the same
# embeddings), index i = CIFAR-100's coarse label i (its _cifar100_to_cifar20 is the coarse map).
PLP_CIFAR20_NAMES = ("aquatic mammals", "fish", "flowers", "food containers", "fruit and vegetables",
                     "household electrical devices", "househould furniture", "insects", "large carnivores",
                     "large man-made outdoor things", "large natural outdoor scenes",
                     "large omnivores and herbivores", "medium-sized mammals", "non-insect invertebrates",
                     "people", "reptiles", "small mammals", "trees", "vehicles 1", "vehicles 2")
COARSE_FILE = "coarse_labels.npy"              # <run>/clip/coarse_labels.npy: tag labels:clip-coarse


def class_names(run_dir) -> list[str]:
    """The dataset's class names as torchvision's `.classes` spells them (the data manifest's
    class_names, from the CIFAR meta files: underscores kept, as PLP prompts them); CedmError when
    it has none."""
    man = RunDir(run_dir).data / "manifest.json"
    if not man.exists():
        raise CedmError(f"{RunDir(run_dir).data} is not complete; run `cedm data --run-dir {run_dir}` first")
    names = load_json(man).get("class_names")
    if not names or len(names) < 2:
        raise CedmError("CLIP pseudo-labels need the dataset's class names (CIFAR-10/100, digits); "
                        "this dataset has none")
    return [str(n) for n in names]


def coarse_class_names(run_dir) -> list[str] | None:
    """The super-class names of the zero-shot at C = 20 (PLP's CIFAR20 names) where the dataset is
    CIFAR-100 with its 20 coarse labels; None otherwise."""
    man = load_json(RunDir(run_dir).data / "manifest.json")
    coarse = man.get("coarse_class_names")
    if man.get("config", {}).get("dataset") != "cifar100" or not coarse or len(coarse) != len(PLP_CIFAR20_NAMES):
        return None
    return list(PLP_CIFAR20_NAMES)


def load_model(model: str, pretrained: str | None, weights=None, model_config=None, device=None):
    """(model, image transform, tokenizer) of open_clip: weights from a local file, else the
    `pretrained` tag (hub cache); model_config: a JSON architecture registered first."""
    import open_clip

    if model_config is not None:
        cfg = Path(model_config)
        if not cfg.is_file() or cfg.suffix != ".json":
            raise CedmError(f"--model-config {model_config}: not a JSON file")
        open_clip.add_model_config(cfg)
    if model not in open_clip.list_models():
        raise CedmError(f"unknown open_clip model {model!r} (see open_clip.list_models(), or --model-config)")
    if weights is not None and not Path(weights).is_file():
        raise CedmError(f"--weights {weights}: no such file")
    source = str(weights) if weights else pretrained
    if not source:
        raise CedmError("CLIP pseudo-labels need pretrained weights: --pretrained TAG or --weights FILE")
    load: contextlib.AbstractContextManager = contextlib.nullcontext()
    if not weights:
        from cedm import hub

        load = hub.loading(hub.open_clip_cached(model, source))   # cached: no request; else no network: the cache at once
    try:
        with load:
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=source, device=device)
    except Exception as e:  # offline hub, missing cache, bad file, key mismatch: never a random init
        msg = " ".join(str(e).split()) or type(e).__name__
        raise CedmError(f"cannot load CLIP weights for {model} from {source}: {type(e).__name__}: {msg[:300]}"
                        + ("" if weights else "; download them once online (HF_HOME cache) or pass --weights FILE")) from None
    return net.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(model)


@torch.no_grad()
def class_embeddings(net, tokenizer, names, templates=TEMPLATES, device=None) -> torch.Tensor:
    """[K, D]: per class, the mean of its L2-normalised prompt embeddings, normalised again."""
    out = []
    for name in names:
        t = net.encode_text(tokenizer([tpl.format(name) for tpl in templates]).to(device)).float()
        m = torch.nn.functional.normalize(t, dim=-1).mean(0)
        out.append(torch.nn.functional.normalize(m, dim=-1))
    return torch.stack(out)


@torch.no_grad()
def image_embeddings(images, net, preprocess, batch_size: int = DEFAULT_BATCH, device=None,
                     progress: bool = False) -> torch.Tensor:
    """[N, D] L2-normalised CLIP image embeddings of uint8 images [N,H,W,3] (the model's transform)."""
    from PIL import Image
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="clip images", file=sys.stderr,
                  disable=None if progress else True):
        x = torch.stack([preprocess(Image.fromarray(np.asarray(im))) for im in images[i:i + batch_size]])
        out.append(torch.nn.functional.normalize(net.encode_image(x.to(device)).float(), dim=-1).cpu())
    return torch.cat(out)


def zero_shot(z: torch.Tensor, net, text: torch.Tensor) -> np.ndarray:
    """[N] int64: argmax_k softmax(logit_scale * cos(image, class k)) of normalised embeddings z."""
    scale = float(net.logit_scale.exp()) if hasattr(net, "logit_scale") else 100.0
    return (scale * z @ text.cpu().T).softmax(-1).argmax(-1).numpy().astype(np.int64)


def _label_summary(labels, names, truth) -> dict:
    out = {"class_names": names, "counts": np.bincount(labels, minlength=len(names)).tolist()}
    if truth is not None:                            # zero-shot accuracy against the ground truth
        out["accuracy"] = float((load_array(truth) == labels).mean())
    return out


def run(run_dir, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, weights=None,
        model_config=None, batch_size: int = DEFAULT_BATCH, device=None, force: bool = False,
        pushgateway=None) -> dict:
    """Write <run>/clip/ (labels.npy, on CIFAR-100 coarse_labels.npy, summary.json); skips when done.
    Returns the summary."""
    rd = RunDir(run_dir)
    out = rd.root / FOLDER
    if batch_size < 1:
        raise CedmError(f"--batch-size must be at least 1, got {batch_size}")
    names, coarse = class_names(run_dir), coarse_class_names(run_dir)
    weights = str(Path(weights).resolve()) if weights else None
    model_config = str(Path(model_config).resolve()) if model_config else None
    config = {"model": model, "pretrained": None if weights else pretrained, "weights": weights,
              "model_config": model_config, "templates": list(TEMPLATES), "class_names": names,
              "coarse_class_names": coarse}
    device = pipeline.resolve_device(device)

    def compute(work, _):
        net, preprocess, tokenizer = load_model(model, pretrained, weights, model_config, device)
        images = load_array(rd.data / "images.npy", mmap=True)
        z = image_embeddings(images, net, preprocess, batch_size, device, progress=True)
        labels = zero_shot(z, net, class_embeddings(net, tokenizer, names, device=device))
        truth = rd.data / "labels.npy"
        summary = {**{k: v for k, v in config.items() if k != "coarse_class_names"}, "num_images": int(len(labels)),
                   **_label_summary(labels, names, truth if truth.exists() else None)}
        save_array(work / "labels.npy", labels)
        outputs = {"labels": "labels.npy", "summary": "summary.json"}
        if coarse:                                   # Table 2's CLIP row at C = 20 (labels:clip-coarse)
            cl = zero_shot(z, net, class_embeddings(net, tokenizer, coarse, device=device))
            truth = rd.data / "coarse_labels.npy"
            summary["coarse"] = _label_summary(cl, coarse, truth if truth.exists() else None)
            save_array(work / COARSE_FILE, cl)
            outputs["coarse_labels"] = COARSE_FILE
        save_json(work / "summary.json", summary)
        print(f"cedm clip-labels: {model}: {len(labels)} images, {len(names)} classes"
              + (f", zero-shot accuracy {summary['accuracy']:.4f}" if "accuracy" in summary else "")
              + (f"; {len(coarse)} super-classes" + (f", accuracy {summary['coarse']['accuracy']:.4f}"
                                                      if "accuracy" in summary["coarse"] else "") if coarse else "")
              + f" -> {out}", file=sys.stderr)
        return pipeline.Output(outputs, value=summary)

    res = pipeline.execute(pipeline.Stage("clip-labels", out, rd.root, config, [rd.data]), compute,
                           force=force, pushgateway=pushgateway)
    return load_json(out / "summary.json") if res.skipped else res.value


def register(sub) -> None:
    p = sub.add_parser("clip-labels", help="zero-shot CLIP pseudo-labels of the training images (tag labels:clip)",
                       description=__doc__.split("\n\n")[0] + " Writes <run>/clip/labels.npy (train on it with "
                                   "`cedm train --cond labels:clip`) and, on CIFAR-100, coarse_labels.npy, the "
                                   "zero-shot over the 20 super-class names (`--cond labels:clip-coarse`).")
    pipeline.add_common(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name (default: %(default)s)")
    p.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                   help="open_clip pretrained tag, from the Hugging Face hub cache (default: %(default)s)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="local open_clip weight file instead of the pretrained tag")
    p.add_argument("--model-config", default=None, metavar="JSON",
                   help="an open_clip model config to register first (its file name is the model name)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="N",
                   help="images per forward pass (default: %(default)s)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    with pipeline.reporting("clip-labels", args.pushgateway, run_dir=args.run_dir):
        run(args.run_dir, args.model, args.pretrained, args.weights, args.model_config, args.batch_size,
            args.device, args.force)
    return 0
