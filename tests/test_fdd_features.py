"""FDD's DINOv2 features as dgm-eval's hub dinov2_vitl14 computes them (docs/method.md#fdd-features):
position embeddings kept at their trained 37x37 grid and resampled per input, bicubic without
antialias, with the hub's +0.1 offset in the scale factor; checked against a restatement of that
interpolation in numpy, on random weights (no download)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cedm import evaluate, features
from cedm.io import CedmError

pytestmark = pytest.mark.usefixtures("one_thread")

A = -0.75                                  # the cubic convolution's coefficient (PyTorch, OpenCV)


def _cubic_weights(t: float) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps x0-1 .. x0+2 at fraction t."""
    def near(x):      # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):       # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def _restated_resample_1d(m: int, n: int) -> np.ndarray:
    """[n, m] matrix of the hub's 1-d resampling: output i reads source (i + 0.5) * m / (n + 0.1)
    - 0.5 (scale factor (n + 0.1) / m, half-pixel centres), taps clamped to the border."""
    out = np.zeros((n, m))
    for i in range(n):
        src = (i + 0.5) * m / (n + 0.1) - 0.5
        x0 = math.floor(src)
        for tap, w in zip(range(x0 - 1, x0 + 3), _cubic_weights(src - x0)):
            out[i, min(max(tap, 0), m - 1)] += w
    return out


def restated_pos_embed(pos_embed: np.ndarray, h: int, w: int) -> np.ndarray:
    """The hub's interpolate_pos_encoding restated: class token kept, the m x m patch grid
    resampled separably to h x w (bicubic, no antialias, +0.1 offset)."""
    d = pos_embed.shape[-1]
    m = int(round(math.sqrt(pos_embed.shape[1] - 1)))
    grid = pos_embed[0, 1:].astype(np.float64).reshape(m, m, d)
    rh, rw = _restated_resample_1d(m, h), _restated_resample_1d(m, w)
    patches = np.einsum("im,jn,mnd->ijd", rh, rw, grid).reshape(h * w, d)
    return np.concatenate([pos_embed[0, :1], patches])[None]


def test_pos_embed_matches_the_restated_hub_interpolation():
    rng = np.random.default_rng(0)
    pe = rng.normal(size=(1, 1 + 37 * 37, 24)).astype(np.float32)       # ViT-L/14 at 518: 37 x 37
    got = features.dinov2_hub_pos_embed(torch.from_numpy(pe), (16, 16))   # 224 / 14 = 16
    assert got.shape == (1, 1 + 256, 24) and got.dtype == torch.float32
    want = restated_pos_embed(pe, 16, 16)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=0)
    # not what timm does once at load (bicubic to the exact size, antialiased): they differ
    grid = torch.from_numpy(pe[:, 1:]).reshape(1, 37, 37, 24).permute(0, 3, 1, 2)
    timm_like = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True)
    assert np.abs(timm_like.permute(0, 2, 3, 1).reshape(256, 24).numpy() - want[0, 1:]).max() > 0.1
    # non-square grids follow the same rule per axis; the native grid is returned as it is
    np.testing.assert_allclose(features.dinov2_hub_pos_embed(torch.from_numpy(pe), (12, 20)).numpy(),
                               restated_pos_embed(pe, 12, 20), atol=2e-5, rtol=0)
    same = torch.from_numpy(pe)
    assert features.dinov2_hub_pos_embed(same, (37, 37)) is same
    with pytest.raises(CedmError, match="square"):
        features.dinov2_hub_pos_embed(torch.zeros(1, 1 + 10, 4), (2, 2))


def _random_dinov2_file(tmp_path, name="vit_small_patch14_dinov2"):
    """A timm DINOv2 ViT with random weights, saved as the weight file a user would pass."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    with torch.no_grad():              # position embeddings with structure, so resampling matters
        model.pos_embed.normal_(0, 1.0)
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):       # LayerScale at the hub's init 1.0 (timm's 1e-5 hides the blocks)
                p.fill_(1.0)
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), path


def test_fdd_extractor_gives_the_hub_model_features(tmp_path, monkeypatch):
    """The FDD extractor (random weights from a file) against a forward written out with the
    restated position embeddings: the same features; timm's load-time resampling is not."""
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref, path = _random_dinov2_file(tmp_path)
    ext = evaluate.dinov2_extractor(str(path), torch.device("cpu"), model_name="vit_small_patch14_dinov2.lvd142m")
    assert ext.cache_tag == evaluate.FDD_FEATURES
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = ext(images)

    with torch.no_grad():
        x = evaluate.dinov2_preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))    # [2,3,224,224]
        tok = ref.patch_embed.proj(x).flatten(2).transpose(1, 2)                       # [2,256,D]
        tok = torch.cat([ref.cls_token.expand(2, -1, -1), tok], 1)
        pe = restated_pos_embed(ref.pos_embed.numpy(), 16, 16)
        tok = tok + torch.from_numpy(pe).float()
        want = ref.norm(ref.blocks(ref.norm_pre(tok)))[:, 0].numpy()
        # today's way: timm resamples the embeddings once when built for 224 px
        old = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=True, num_classes=0, img_size=224,
                                pretrained_cfg_overlay=dict(file=str(path))).eval()
        before = old(x).numpy()
    assert got.shape == (2, ref.num_features)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(before - want).max() > 100 * np.abs(got - want).max() + 1e-3


def test_only_plain_class_token_vits_take_the_hub_embeddings():
    import timm

    with pytest.raises(CedmError, match="dynamic_img_size"):
        features.use_dinov2_hub_pos_embed(timm.create_model("vit_small_patch14_dinov2", pretrained=False,
                                                            num_classes=0, img_size=56))
    with pytest.raises(CedmError, match="register"):
        features.use_dinov2_hub_pos_embed(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False,
                                                            num_classes=0, dynamic_img_size=True, img_size=56))
