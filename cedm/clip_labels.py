"""`cedm clip-labels`: zero-shot CLIP pseudo-labels of the training images, a conditioning of the
paper's Table 2 (tag `labels:clip`; docs/method.md#clip-labels).

Each class name of the dataset (the data manifest's `class_names`, '_' read as a space) is put
into the five prompt templates below; the text embeddings of the five prompts are L2-normalised,
averaged and normalised again (CLIP's zero-shot recipe). Each image, preprocessed by the CLIP
model's own evaluation transform, is embedded and normalised; its pseudo-label is the argmax over
classes of softmax(logit_scale * cos(image, class)). The model is OpenCLIP's (open_clip_torch),
by default ViT-bigG-14 trained on LAION-2B (the paper's ViT-G/14): pretrained weights from the
Hugging Face hub cache, or a local file (--weights); missing weights are an error, never a random
init. --model-config registers another open_clip architecture from its JSON config.

Writes <run>/clip/: labels.npy [N] int64 (class indices of data's class_names), summary.json
(model, templates, class names, counts per class, and the agreement with data/labels.npy when
the dataset has labels: the zero-shot accuracy), manifest.json (config + inputs: the stage layer).
"""
from __future__ import annotations

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


def class_names(run_dir) -> list[str]:
    """The dataset's class names (data manifest), '_' read as a space; CedmError when it has none."""
    man = RunDir(run_dir).data / "manifest.json"
    if not man.exists():
        raise CedmError(f"{RunDir(run_dir).data} is not complete; run `cedm data --run-dir {run_dir}` first")
    names = load_json(man).get("class_names")
    if not names or len(names) < 2:
        raise CedmError("CLIP pseudo-labels need the dataset's class names (CIFAR-10/100, digits); "
                        "this dataset has none")
    return [str(n).replace("_", " ") for n in names]


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
    if not weights:
        from cedm import hub

        hub.offline()                        # no network: the hub answers from its cache at once
    try:
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
def pseudo_labels(images, net, preprocess, text: torch.Tensor, batch_size: int = DEFAULT_BATCH,
                  device=None, progress: bool = False) -> np.ndarray:
    """[N] int64: argmax_k softmax(logit_scale * cos(image, class k)) of uint8 images [N,H,W,3]."""
    from PIL import Image
    from tqdm import tqdm

    scale = float(net.logit_scale.exp()) if hasattr(net, "logit_scale") else 100.0
    out = np.empty(len(images), np.int64)
    for i in tqdm(range(0, len(images), batch_size), desc="clip labels", file=sys.stderr,
                  disable=None if progress else True):
        x = torch.stack([preprocess(Image.fromarray(np.asarray(im))) for im in images[i:i + batch_size]])
        z = torch.nn.functional.normalize(net.encode_image(x.to(device)).float(), dim=-1)
        probs = (scale * z @ text.T).softmax(-1)
        out[i:i + len(x)] = probs.argmax(-1).cpu().numpy()
    return out


def run(run_dir, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, weights=None,
        model_config=None, batch_size: int = DEFAULT_BATCH, device=None, force: bool = False,
        pushgateway=None) -> dict:
    """Write <run>/clip/ (labels.npy, summary.json); skips when done. Returns the summary."""
    rd = RunDir(run_dir)
    out = rd.root / FOLDER
    if batch_size < 1:
        raise CedmError(f"--batch-size must be at least 1, got {batch_size}")
    names = class_names(run_dir)
    weights = str(Path(weights).resolve()) if weights else None
    model_config = str(Path(model_config).resolve()) if model_config else None
    config = {"model": model, "pretrained": None if weights else pretrained, "weights": weights,
              "model_config": model_config, "templates": list(TEMPLATES)}
    device = pipeline.resolve_device(device)

    def compute(work, _):
        net, preprocess, tokenizer = load_model(model, pretrained, weights, model_config, device)
        images = load_array(rd.data / "images.npy", mmap=True)
        text = class_embeddings(net, tokenizer, names, device=device)
        labels = pseudo_labels(images, net, preprocess, text, batch_size, device, progress=True)
        summary = {**config, "class_names": names, "num_images": int(len(labels)),
                   "counts": np.bincount(labels, minlength=len(names)).tolist()}
        if (rd.data / "labels.npy").exists():       # zero-shot accuracy against the ground truth
            summary["accuracy"] = float((load_array(rd.data / "labels.npy") == labels).mean())
        save_array(work / "labels.npy", labels)
        save_json(work / "summary.json", summary)
        print(f"cedm clip-labels: {model}: {len(labels)} images, {len(names)} classes"
              + (f", zero-shot accuracy {summary['accuracy']:.4f}" if "accuracy" in summary else "")
              + f" -> {out}/labels.npy", file=sys.stderr)
        return pipeline.Output({"labels": "labels.npy", "summary": "summary.json"}, value=summary)

    res = pipeline.execute(pipeline.Stage("clip-labels", out, rd.root, config, [rd.data]), compute,
                           force=force, pushgateway=pushgateway)
    return load_json(out / "summary.json") if res.skipped else res.value


def register(sub) -> None:
    p = sub.add_parser("clip-labels", help="zero-shot CLIP pseudo-labels of the training images (tag labels:clip)",
                       description=__doc__.split("\n\n")[0] + " Writes <run>/clip/labels.npy; train on it "
                                   "with `cedm train --cond labels:clip`.")
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
