"""TEMI clustering heads on frozen features (docs/method.md#temi; defaults: cedm.config.TEMIConfig).

H heads are ONE batched computation: every weight is stacked along a leading head dimension and
each layer is a single batched matmul, so the cost does not grow with Python calls per head.
Head i: z -> Linear(D, 512) -> GELU -> Linear(512, 256) -> L2 normalise -> weight-normalised
Linear(256, C) without bias, logits = g * cos (DINO-style weight norm: the gain g [C] starts at 1
and trains, the paper's Table 8 "norm last layer: false"; norm_last_layer=True fixes g = 1, so
logits are cosines) -> softmax(logits / 0.1). The student trains; the teacher is its EMA
(momentum 0.996, constant as in the published command).

Training pairs (x, x') draw x' uniformly among the kNN of x. The cluster prior q~_t (EMA 0.9 of
the batch-mean teacher probabilities, init 1/C) is updated BEFORE the loss, and the symmetrised
loss per head comes from cedm.ops.temi_loss (fused kernel when built, else its reference).
AdamW (weight decay 1e-4 on weights only), fp32, as the official TEMI code schedules it
(docs/method.md#temi-training): lr x batch/256 with a linear warm-up from 0 and a cosine decay
to min_lr, per step (`lr_schedule`); the last layer (v, g) fixed during the first epoch.
lr_schedule="constant" keeps lr as given. Afterwards the head with the lowest loss over the last
epoch is kept and c*(x) = argmax_c q_t(c|x) with its teacher.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch import nn

from cedm import ops
from cedm.config import TEMI
from cedm.io import CedmError, save_tensors

HIDDEN, BOTTLENECK = TEMI.hidden, TEMI.bottleneck   # 768 -> 512 -> GELU -> 256 -> L2 -> C


class TEMIHeads(nn.Module):
    """H stacked heads: features [B,D] -> logits [H,B,C] (g * cosines, before the temperature).

    On a GPU all heads are one batched computation. On a CPU the heads run in chunks of
    `chunk_heads(B)` heads: each chunk's activations stay in the cache between the batched matmul
    that writes them and the elementwise ops (bias, GELU, L2 norm) that read them, and stay below
    the allocator's size for returning memory to the OS (no page faults on every step); all H at
    once (~100 MB at the paper's size) do neither and run at 0.8x a per-head loop, chunked at
    about 1x (the matmuls, the same FLOPs either way, are most of the time on a CPU). `head_chunk`
    overrides the size (None: automatic). The chunks compute the same per-head matmuls.
    """

    # CPU activation budget per chunk, bytes of one [k,B,hidden] float32 tensor: a few MB, the L2
    # and a share of the L3 of a core (4 heads at the paper's size; benchmarks/bench_cluster.py).
    CHUNK_BYTES = 8 << 20

    def __init__(self, dim: int, clusters: int, heads: int = 50, hidden: int = HIDDEN,
                 bottleneck: int = BOTTLENECK, generator: torch.Generator | None = None,
                 head_chunk: int | None = None):
        super().__init__()
        self.dim, self.clusters, self.heads = dim, clusters, heads
        self.head_chunk = head_chunk
        self.w1 = nn.Parameter(torch.empty(heads, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(heads, hidden))
        self.w2 = nn.Parameter(torch.empty(heads, hidden, bottleneck))
        self.b2 = nn.Parameter(torch.zeros(heads, bottleneck))
        self.v = nn.Parameter(torch.empty(heads, bottleneck, clusters))   # weight_v of the last layer
        self.g = nn.Parameter(torch.ones(heads, 1, clusters))             # weight_g, DINO's init 1
        with torch.no_grad():                      # DINO head init: trunc normal 0.02, zero biases
            nn.init.trunc_normal_(self.w1, std=0.02, generator=generator)
            nn.init.trunc_normal_(self.w2, std=0.02, generator=generator)
            bound = 1 / math.sqrt(bottleneck)      # nn.Linear default for the weight-normed layer
            self.v.uniform_(-bound, bound, generator=generator)

    def chunk_heads(self, batch: int) -> int:
        """Heads per batched computation for a batch of `batch` rows on this module's device."""
        if self.head_chunk is not None:
            return max(1, min(self.heads, int(self.head_chunk)))
        if self.w1.device.type != "cpu":
            return self.heads                                             # one batched computation
        per_head = batch * self.w1.shape[2] * self.w1.element_size()     # one head's [B,512]
        return max(1, min(self.heads, self.CHUNK_BYTES // max(1, per_head)))

    @staticmethod
    def _heads(z, w1, b1, w2, b2, v, g):
        h = torch.baddbmm(b1[:, None], z.expand(len(w1), *z.shape), w1)   # [h,B,512]
        h = torch.nn.functional.gelu(h)
        h = torch.baddbmm(b2[:, None], h, w2)                             # [h,B,256]
        h = torch.nn.functional.normalize(h, dim=-1)                      # L2 normalise
        v = v / v.norm(dim=1, keepdim=True) * g                           # weight norm: g v / |v|
        return torch.bmm(h, v)                                            # [h,B,C]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        params = (self.w1, self.b1, self.w2, self.b2, self.v, self.g)
        k = self.chunk_heads(z.shape[0])
        if k >= self.heads:
            return self._heads(z, *params)
        # split (not slicing per chunk): its backward is one concatenation of the chunks' grads
        return torch.cat([self._heads(z, *p) for p in zip(*(t.split(k) for t in params))])

    def decay_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay on weights only, not on biases (the paper's Table 8); the
        gain g [C,1] per head is a weight there too (DINO's groups decay every non-1-d tensor)."""
        return [{"params": [self.w1, self.w2, self.v, self.g], "weight_decay": weight_decay},
                {"params": [self.b1, self.b2], "weight_decay": 0.0}]

    @property
    def last_layer(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The weight-normalised last layer: weight_v and the gain g."""
        return self.v, self.g

    def select(self, i: int) -> "TEMIHeads":
        """A 1-head copy of head i."""
        one = TEMIHeads(self.dim, self.clusters, 1, self.w1.shape[2], self.w2.shape[2])
        with torch.no_grad():
            for name, p in one.named_parameters():
                p.copy_(getattr(self, name)[i:i + 1])
        return one.to(self.w1.device)


class TEMIHead(nn.Module):
    """One kept head as a classifier: features [N,D] -> probabilities q_t(c|x) [N,C]."""

    def __init__(self, heads: TEMIHeads, temperature: float = 0.1):
        super().__init__()
        if heads.heads != 1:
            raise ValueError("TEMIHead wraps exactly one head (use TEMIHeads.select)")
        self.net, self.temperature = heads, float(temperature)

    @property
    def clusters(self) -> int:
        return self.net.clusters

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(z)[0] / self.temperature, dim=-1)

    @torch.no_grad()
    def predict(self, features, batch_size: int = 8192) -> np.ndarray:
        """Probabilities [N,C] float32 for a numpy/torch feature array, in batches."""
        dev = self.net.w1.device

        def rows(i):
            x = features[i:i + batch_size]
            x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, np.float32))
            return x.to(dev, torch.float32)

        out = [self(rows(i)).cpu() for i in range(0, len(features), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.clusters), np.float32)

    def save(self, path, extra: dict | None = None) -> None:
        n = self.net
        save_tensors(path, {k: p[0] for k, p in n.named_parameters()},
                     {"kind": "temi", "dim": n.dim, "clusters": n.clusters, "hidden": n.w1.shape[2],
                      "bottleneck": n.w2.shape[2], "temperature": self.temperature, **(extra or {})})


class TEMILoss(nn.Module):
    """The TEMI loss (docs/method.md#temi-loss) owning the cluster prior q~_t and its update
    (docs/method.md#temi-prior), as DINO's DINOLoss owns its centre.

    prior [H,C]: an EMA (momentum `prior_momentum`) of the teacher's batch-mean probabilities,
    initialised to 1/C and updated before the loss of each batch. `forward(logits, q_t)` takes the
    student logits and teacher probabilities [2,H,B,C] (the two views) and returns the
    symmetrised loss per head [H] (cedm.ops.temi_loss: fused kernel when built, else reference).
    """

    def __init__(self, heads: int, clusters: int, gamma: float = TEMI.gamma,
                 temperature: float = TEMI.temperature, prior_momentum: float = TEMI.prior_momentum,
                 device=None):
        super().__init__()
        self.gamma, self.temperature, self.prior_momentum = gamma, temperature, prior_momentum
        self.register_buffer("prior", torch.full((heads, clusters), 1.0 / clusters, device=device))

    @torch.no_grad()
    def update_prior(self, q_t: torch.Tensor) -> None:
        m = self.prior_momentum
        self.prior.mul_(m).add_(q_t.mean(dim=(0, 2)), alpha=1 - m)         # q~ <- m q~ + (1-m) mean q_t

    def forward(self, logits: torch.Tensor, q_t: torch.Tensor) -> torch.Tensor:
        self.update_prior(q_t)                                                # before the loss
        return ops.temi_loss(logits.contiguous(), q_t, self.prior, self.gamma, self.temperature)


class Trainer:
    """Student and teacher heads, AdamW and the TEMI loss (with its prior); `step(z)` is one update.

    z [2B,D] stacks the two views of B pairs: rows 0..B-1 are x, rows B..2B-1 their x'.
    """

    def __init__(self, dim: int, clusters: int, heads: int = TEMI.heads, hidden: int = HIDDEN,
                 bottleneck: int = BOTTLENECK, gamma: float = TEMI.gamma, lr: float = TEMI.lr,
                 weight_decay: float = TEMI.weight_decay, teacher_momentum: float = TEMI.teacher_momentum,
                 prior_momentum: float = TEMI.prior_momentum, temperature: float = TEMI.temperature,
                 generator: torch.Generator | None = None, device=None,
                 norm_last_layer: bool = TEMI.norm_last_layer):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.clusters, self.heads, self.gamma, self.temperature = clusters, heads, gamma, temperature
        self.teacher_momentum, self.prior_momentum = teacher_momentum, prior_momentum
        self.student = TEMIHeads(dim, clusters, heads, hidden, bottleneck, generator=generator).to(device)
        self.student.g.requires_grad_(not norm_last_layer)                 # True: g stays 1 (cosines)
        self.teacher = TEMIHeads(dim, clusters, heads, hidden, bottleneck).to(device).requires_grad_(False)
        self.teacher.load_state_dict(self.student.state_dict())
        self.opt = torch.optim.AdamW(self.student.decay_groups(weight_decay), lr=lr,  # fused: one pass
                                     fused=device.type in ("cpu", "cuda"))
        self.loss = TEMILoss(heads, clusters, gamma, temperature, prior_momentum, device=device)
        self._s, self._t = list(self.student.parameters()), list(self.teacher.parameters())

    @property
    def prior(self) -> torch.Tensor:
        """The cluster prior q~_t [H,C] (owned by the loss)."""
        return self.loss.prior

    def step(self, z: torch.Tensor, lr: float | None = None, freeze_last_layer: bool = False) -> torch.Tensor:
        """One update on the pairs in z [2B,D]; returns the per-head loss [H] (detached).

        lr: this step's learning rate (None: unchanged). freeze_last_layer: drop the last layer's
        gradients (v, g), so AdamW leaves it as it is this step (DINO's cancel_gradients_last_layer).
        """
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = float(lr)
        h, c, b = self.heads, self.clusters, len(z) // 2
        logits = self.student(z).view(h, 2, b, c).transpose(0, 1)                   # [2,H,B,C]
        with torch.no_grad():
            q_t = torch.softmax(self.teacher(z) / self.temperature, dim=-1)
            q_t = q_t.view(h, 2, b, c).transpose(0, 1).contiguous()                  # [2,H,B,C]
        loss_h = self.loss(logits, q_t)                                               # [H]
        self.opt.zero_grad(set_to_none=True)
        loss_h.mean().backward()                                                      # mean over heads
        if freeze_last_layer:
            for p in self.student.last_layer:
                p.grad = None
        self.opt.step()
        with torch.no_grad():                                                         # teacher EMA
            torch._foreach_lerp_(self._t, self._s, 1 - self.teacher_momentum)
        return loss_h.detach()


def lr_per_step(lr: float, batch: int, epochs: int, steps: int, warmup_epochs: float = TEMI.warmup_epochs,
                min_lr: float = TEMI.min_lr, kind: str = TEMI.lr_schedule) -> np.ndarray:
    """Learning rate per step [epochs*steps] (docs/method.md#temi-training).

    "cosine" (the official TEMI/DINO cosine_scheduler): base = lr x batch/256; a linear warm-up
    from 0 to base over min(warmup_epochs, epochs/20) epochs (10 of the paper's 200; a short
    schedule keeps the same 5% share), then base -> min_lr along a half cosine.
    "constant": lr at every step.
    """
    total = int(epochs) * int(steps)
    if kind == "constant":
        return np.full(total, float(lr))
    if kind != "cosine":
        raise CedmError(f"unknown TEMI lr schedule {kind!r}; choose cosine or constant")
    base = float(lr) * batch / 256
    warm = min(int(min(float(warmup_epochs), epochs / 20) * steps), total)
    rest = np.arange(total - warm)
    cos = min_lr + 0.5 * (base - min_lr) * (1 + np.cos(np.pi * rest / max(1, len(rest))))
    return np.concatenate([np.linspace(0.0, base, warm), cos])


def train(features, knn, clusters: int, heads: int = TEMI.heads, epochs: int = TEMI.epochs,
          batch_size: int = TEMI.batch_size, gamma: float = TEMI.gamma, lr: float = TEMI.lr,
          weight_decay: float = TEMI.weight_decay, teacher_momentum: float = TEMI.teacher_momentum,
          prior_momentum: float = TEMI.prior_momentum, temperature: float = TEMI.temperature,
          hidden: int = HIDDEN, bottleneck: int = BOTTLENECK, norm_last_layer: bool = TEMI.norm_last_layer,
          lr_schedule: str = TEMI.lr_schedule, warmup_epochs: float = TEMI.warmup_epochs,
          min_lr: float = TEMI.min_lr, freeze_last_layer: int = TEMI.freeze_last_layer,
          seed: int = 0, device=None, progress: bool = False) -> dict:
    """Train H TEMI heads on features [N,D] with neighbours knn [N,k] (docs/method.md#temi).

    hidden/bottleneck: head widths (the paper: 512/256; smaller only for quick tests/demos).
    norm_last_layer, lr_schedule, warmup_epochs, min_lr, freeze_last_layer: the official training
    (module docstring); norm_last_layer=True, lr_schedule="constant", freeze_last_layer=0 train
    with g = 1 at a fixed lr.
    Returns {"head": TEMIHead (kept teacher), "best_head", "head_losses" [H] (mean over the last
    epoch), "loss" (kept head's), "loss_history" (kept head's per-epoch mean), "probs" [N,C]}.
    Deterministic for a seed (one torch.Generator drives init, shuffling and neighbour draws).
    """
    from tqdm import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    feats = torch.from_numpy(np.array(features, np.float32)).to(device)   # copy: mmaps are read-only
    nbrs = torch.as_tensor(np.asarray(knn, np.int64)).to(device)
    n, k = nbrs.shape
    g = torch.Generator().manual_seed(int(seed))
    tr = Trainer(feats.shape[1], clusters, heads, hidden, bottleneck, gamma, lr, weight_decay,
                 teacher_momentum, prior_momentum, temperature, generator=g, device=device,
                 norm_last_layer=norm_last_layer)
    bs = min(batch_size, n)
    steps = n // bs                                                      # drop the ragged last batch
    lrs = lr_per_step(lr, bs, epochs, steps, warmup_epochs, min_lr, lr_schedule).tolist()
    history = torch.zeros(epochs, heads, dtype=torch.float64)

    bar = tqdm(range(epochs), desc=f"TEMI C={clusters} H={heads}", file=sys.stderr,
               disable=None if progress else True)
    for epoch in bar:
        perm = torch.randperm(n, generator=g).to(device)
        draws = torch.randint(k, (steps * bs,), generator=g).to(device)
        acc = torch.zeros(heads, device=device)
        for s in range(steps):
            x = perm[s * bs:(s + 1) * bs]
            x2 = nbrs[x, draws[s * bs:(s + 1) * bs]]                    # x' uniform among kNN(x)
            acc += tr.step(feats[torch.cat([x, x2])], lrs[epoch * steps + s],   # z [2B,D]: views x, x'
                           freeze_last_layer=epoch < freeze_last_layer)
        history[epoch] = (acc / steps).double().cpu()
        if not torch.isfinite(history[epoch]).all():
            raise CedmError(f"TEMI loss became non-finite at epoch {epoch} (check the features)")
        bar.set_postfix(loss=f"{history[epoch].min().item():.4f}")

    last = history[-1]
    best = int(torch.argmin(last))                                       # lowest last-epoch loss
    head = TEMIHead(tr.teacher.select(best), temperature).eval()         # c* from q_t
    probs = head.predict(feats)
    return {"head": head, "best_head": best, "head_losses": last.tolist(), "loss": float(last[best]),
            "loss_history": history[:, best].tolist(), "probs": probs}
