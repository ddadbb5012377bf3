"""C-EDM generator: SongUNet (DDPM++) and the EDM preconditioning wrapper (docs/method.md#c-edm).

Written after the structure of NVlabs/edm `training/networks.py` (DDPM++ configuration only:
positional noise embedding, standard encoder/decoder, [1,1] resampling filter). The class label
is the cluster id, one-hot, scaled by sqrt(label_dim); a dropped label (classifier-free guidance)
is the zero vector. label_dim = 0 is the unconditional model; ground-truth labels and clusters
use the same path. Presets: 'cifar' and 'ffhq64' (the paper's Table 7; 64x64 trains with lr 2e-4 as EDM), 'afhq64'
(ffhq64 with dropout 0.25), 'tiny' (built-in default, tests).
"""
from __future__ import annotations

import math
from dataclasses import asdict, replace

import torch
from torch.nn.functional import silu

from cedm import ops
from cedm.config import TRAIN, TrainConfig
from cedm.io import CedmError

# ----------------------------------------------------------------------------------------------
# Presets (docs/method.md#edm-training; EDM Table 7): the architecture, and the training config
# (cedm.config.TrainConfig, whose defaults are CIFAR's) composed per network. Sizes in Mimg.

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "cifar": TRAIN,
    # 64x64: lr 2e-4 as EDM and the official C-EDM script (Table 7's 1e-3: `--lr 1e-3`)
    "ffhq64": replace(TRAIN, batch=512, lr=2e-4, augment_p=0.15),
    "tiny": replace(TRAIN, batch=64, lr=2e-3, lr_ramp_mimg=0.002, precision="fp32", precision_cpu="fp32"),
}
NETWORK_PRESETS: dict[str, dict] = {
    "cifar": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                  dropout=0.13, **asdict(TRAIN_PRESETS["cifar"])),
    "ffhq64": dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                   dropout=0.05, **asdict(TRAIN_PRESETS["ffhq64"])),
    # Built-in default (digits, 8x8): attention at the lowest resolution, a step in tens of ms
    # on a CPU. No dropout: the run is a few epochs, and it keeps DDP == 1 process exactly.
    "tiny": dict(model_channels=16, channel_mult=(1, 1), num_blocks=1, attn_resolutions=("lowest",),
                 dropout=0.0, **asdict(TRAIN_PRESETS["tiny"])),
}
# AFHQv2-64: FFHQ-64's network and training with dropout 0.25 (EDM's AFHQv2-64 setting)
TRAIN_PRESETS["afhq64"] = TRAIN_PRESETS["ffhq64"]
NETWORK_PRESETS["afhq64"] = dict(NETWORK_PRESETS["ffhq64"], dropout=0.25)
# Fields of a preset that are network constructor arguments (the rest are training defaults).
_ARCH_KEYS = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")
AUGMENT_DIM = 9  # EDM geometric augmentation labels (cedm.augment)


def train_preset(name: str) -> TrainConfig:
    """The training config of a network preset."""
    network_preset(name)
    return TRAIN_PRESETS[name]


def network_preset(name: str) -> dict:
    try:
        return dict(NETWORK_PRESETS[name])
    except KeyError:
        raise CedmError(f"unknown network preset {name!r}; choose one of {', '.join(NETWORK_PRESETS)}") from None


def network_kwargs(name: str, resolution: int, label_dim: int, augment: bool = True, **overrides) -> dict:
    """Constructor kwargs of EDMPrecond for a preset at a resolution (JSON-serialisable)."""
    p = network_preset(name)
    kw = {k: p[k] for k in _ARCH_KEYS}
    kw.update(overrides)
    levels = len(kw["channel_mult"])
    if resolution % (1 << (levels - 1)) or resolution < (1 << (levels - 1)):
        raise CedmError(f"resolution {resolution} is not divisible by 2^{levels - 1} "
                        f"(network preset {name!r} has {levels} levels)")
    lowest = resolution >> (levels - 1)
    kw["attn_resolutions"] = [lowest if r == "lowest" else int(r) for r in kw["attn_resolutions"]]
    kw["channel_mult"] = list(kw["channel_mult"])
    return dict(img_resolution=int(resolution), img_channels=3, label_dim=int(label_dim),
                augment_dim=AUGMENT_DIM if augment else 0, sigma_data=0.5, **kw)


# ----------------------------------------------------------------------------------------------
# Layers (EDM networks.py: weight_init, Linear, Conv2d with resampling, GroupNorm)

def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="xavier_uniform",
                 init_weight=1.0, init_bias=0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class Conv2d(torch.nn.Module):
    """Convolution with optional 2x up/down resampling by the [1,1] filter (kernel 0 = resample only)."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), init_mode="xavier_uniform", init_weight=1.0, init_bias=0.0):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans)
                                          * init_weight) if kernel else None)
        self.bias = (torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        f = self.resample_filter
        if f is not None:
            f = f.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            if self.up:
                x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]),
                                                         groups=self.in_channels, stride=2, padding=pad)
            else:
                x = torch.nn.functional.conv2d(x, f.tile([self.in_channels, 1, 1, 1]),
                                               groups=self.in_channels, stride=2, padding=pad)
        if self.weight is not None:
            x = torch.nn.functional.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
        return x


class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-6):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def silu(self, x):
        """silu(self(x)) as one fused op on a CPU (cedm.ops.group_norm_silu)."""
        return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps)


class UNetBlock(torch.nn.Module):
    """DDPM++ residual block: GN-SiLU-conv, + embedding, GN-SiLU-dropout-conv, skip, optional attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 dropout=0.0, skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=(1, 1),
                 init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = init or {}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.skip_scale = dropout, skip_scale
        self.num_heads = 1 if attention else 0
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:  # resample_proj=True in DDPM++
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(self.norm0.silu(x))
        x = self.norm1.silu(x + self.affine(emb)[:, :, None, None].to(x.dtype))  # adaptive_scale=False
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            n, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            a = torch.nn.functional.scaled_dot_product_attention(   # softmax(q^T k / sqrt(c)) v
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = (self.proj(a.transpose(1, 2).reshape(n, c, h, w)) + x) * self.skip_scale
        return x


class PositionalEmbedding(torch.nn.Module):
    """Transformer sinusoidal embedding of the noise level c_noise (endpoint=True as DDPM++)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.float().ger(freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------------------------
# SongUNet (DDPM++), EDM networks.py with embedding_type='positional', encoder/decoder 'standard'

class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, resample_filter=(1, 1)):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping: noise level, label (one-hot * sqrt(label_dim)), augmentation labels -> embedding.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # swap sin/cos (DDPM++)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("this network is class-conditional: class_labels required")
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))  # one-hot*sqrt(L)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        skips = []
        for blk in self.enc.values():
            x = blk(x, emb) if isinstance(blk, UNetBlock) else blk(x)
            skips.append(x)
        out = None
        for name, blk in self.dec.items():
            if name.endswith("aux_norm"):
                out = blk.silu(x)
            elif name.endswith("aux_conv"):
                out = blk(out)
            else:
                if x.shape[1] != blk.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = blk(x, emb)
        return out


# ----------------------------------------------------------------------------------------------
# EDM preconditioning (EDM Table 1; docs/method.md#edm-precond: c_skip, c_out, c_in, c_noise = ln(sigma)/4)

class EDMPrecond(torch.nn.Module):
    """D(x; sigma, label) = c_skip x + c_out F(c_in x; c_noise, label) around a SongUNet."""

    def __init__(self, img_resolution, img_channels=3, label_dim=0, augment_dim=0, sigma_data=0.5,
                 **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.augment_dim, self.sigma_data = label_dim, augment_dim, sigma_data
        self.model = SongUNet(img_resolution, img_channels, img_channels, label_dim=label_dim,
                              augment_dim=augment_dim, **unet_kwargs)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_F=False):
        """x [B,C,H,W] float32, sigma [B]; class_labels [B,label_dim] (zeros = no label).

        Returns D(x; sigma), or the raw network output F when return_F (for the fused loss).
        """
        sigma = sigma.to(torch.float32).reshape(-1)
        if class_labels is None and self.label_dim:
            class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
        c_noise = sigma.log() / 4                                            # c_noise = ln(sigma)/4
        x_in = ops.edm_scale_input(x.to(torch.float32), sigma, self.sigma_data)  # c_in x
        F = self.model(x_in, c_noise, class_labels, augment_labels).to(torch.float32)
        if return_F:
            return F
        return ops.edm_denoise(x.to(torch.float32), F, sigma, self.sigma_data)  # c_skip x + c_out F


def memory_format(device: torch.device, precision: str) -> torch.memory_format:
    """The layout the network runs in: channels_last where it pays, on CUDA (tensor cores) and
    for bf16 on a CPU (oneDNN's bf16 convolutions); contiguous for fp32 on a CPU, where it
    measured no faster. Either layout gives the same function (the parameters keep their names)."""
    return torch.channels_last if device.type == "cuda" or precision == "bf16" else torch.contiguous_format


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision: fp32 (off), bf16 or fp16."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def build(kwargs: dict) -> EDMPrecond:
    """The network from its JSON kwargs (network.json)."""
    kw = dict(kwargs)
    kw["channel_mult"] = tuple(kw["channel_mult"])
    kw["attn_resolutions"] = tuple(kw["attn_resolutions"])
    return EDMPrecond(**kw)
