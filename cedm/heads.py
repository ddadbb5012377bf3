"""Loading a saved cluster head (`cedm cluster`'s head.safetensors) as a classifier.

Either kind comes back as a module features [N,D] -> probabilities [N,C] with `.predict` and
`.clusters`: a TEMI head (the kept head's teacher, cedm.temi) or k-means centroids
(cedm.kmeans.CentroidHead). Used by `cedm evaluate` for the confidence of generated images.
"""
from __future__ import annotations

import torch
from torch import nn

from cedm.io import CedmError, load_tensors
from cedm.kmeans import CentroidHead
from cedm.temi import TEMIHead, TEMIHeads


def load_head(path, device=None) -> nn.Module:
    """Rebuild the head saved by `cedm cluster` (head.safetensors): features [N,D] -> probs [N,C].

    TEMI: the kept head's teacher. k-means: the centroids (probabilities are one-hot on the nearest
    centroid: Euclidean for `kmeans`, cosine for `skmeans`). Both have `.predict(features) -> [N,C]` and `.clusters`.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise CedmError(f"missing head file: {path}") from None
    except Exception as e:
        raise CedmError(f"corrupt head file {path}: {e}") from None
    t = load_tensors(path)
    kind = meta.get("kind")
    if kind == "kmeans":                 # heads saved before "metric" existed were cosine k-means
        return CentroidHead(t["centroids"], meta.get("metric", "cosine")).to(device or "cpu")
    if kind != "temi":
        raise CedmError(f"{path} is not a cedm cluster head (metadata kind={kind!r})")
    heads = TEMIHeads(int(meta["dim"]), int(meta["clusters"]), 1, int(meta["hidden"]), int(meta["bottleneck"]))
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if name == "g" and name not in t:       # saved before the gain trained: it was fixed at 1
                continue                            # (TEMIHeads initialises g to 1)
            if name not in t or tuple(t[name].shape) != tuple(p.shape[1:]):
                raise CedmError(f"corrupt head file {path}: tensor {name!r} is missing or has the wrong "
                                f"shape; redo `cedm cluster`")
            p.copy_(t[name][None])
    return TEMIHead(heads, float(meta["temperature"])).to(device or "cpu").eval()
