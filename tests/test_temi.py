"""cedm.temi: batched heads, one exact training step, kept head, determinism (docs/method.md#temi)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cedm import heads, ops, temi
from cedm.knn import cosine_knn


pytestmark = pytest.mark.usefixtures("one_thread")


def _per_head(heads: temi.TEMIHeads, z: torch.Tensor, i: int) -> torch.Tensor:
    """Head i computed on its own, the textbook way (docs/method.md#temi)."""
    h = torch.nn.functional.gelu(z @ heads.w1[i] + heads.b1[i])
    h = h @ heads.w2[i] + heads.b2[i]
    h = h / h.norm(dim=1, keepdim=True)
    v = heads.v[i] / heads.v[i].norm(dim=0, keepdim=True)      # weight norm per output
    return (h @ v) * heads.g[i, 0]                              # times the gain g per output


def test_batched_heads_equal_separate_heads():
    g = torch.Generator().manual_seed(0)
    heads = temi.TEMIHeads(12, 7, heads=3, hidden=16, bottleneck=8, generator=g)
    with torch.no_grad():                                      # non-zero biases too
        heads.b1.normal_(generator=g)
        heads.b2.normal_(generator=g)
    z = torch.randn(9, 12, generator=g)
    out = heads(z)
    assert out.shape == (3, 9, 7)
    for i in range(3):
        torch.testing.assert_close(out[i], _per_head(heads, z, i), rtol=1e-5, atol=1e-6)
    assert out.abs().max() <= 1 + 1e-6                         # g = 1 at init: cosine logits
    with torch.no_grad():                                      # scale of weight_v does not matter
        heads.v.mul_(3.7)
    torch.testing.assert_close(heads(z), out)
    with torch.no_grad():                                      # the gain scales each output
        heads.g.copy_(torch.rand(3, 1, 7, generator=g) * 4)
    scaled = heads(z)
    torch.testing.assert_close(scaled, out * heads.g.detach())
    for i in range(3):
        torch.testing.assert_close(scaled[i], _per_head(heads, z, i), rtol=1e-5, atol=1e-6)
    for k in (1, 2):                                           # CPU chunks: same per-head math
        heads.head_chunk = k
        torch.testing.assert_close(heads(z), scaled)
    groups = heads.decay_groups(1e-4)                          # decay on weights, not biases
    assert {id(p) for p in groups[0]["params"]} == {id(heads.w1), id(heads.w2), id(heads.v), id(heads.g)}
    assert groups[1]["weight_decay"] == 0 and {id(p) for p in groups[1]["params"]} == {id(heads.b1), id(heads.b2)}


def test_one_training_step_matches_the_paper_recipe(monkeypatch):
    """train() with one step equals a hand-written step: pairs from the kNN, prior EMA updated
    before the loss, AdamW on the mean head loss, teacher EMA; the kept head is the teacher."""
    n, d, c, h, k, seed = 16, 6, 4, 3, 3, 5
    gen = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).numpy()
    nbrs = cosine_knn(x, k)
    kw = dict(heads=h, epochs=1, batch_size=n, gamma=0.6, lr=1e-2, weight_decay=1e-4,
              teacher_momentum=0.5, prior_momentum=0.9, temperature=0.1, hidden=8, bottleneck=5,
              lr_schedule="constant", freeze_last_layer=0)       # one step at lr; g trains

    seen = {}
    real = ops.temi_loss

    def spy(s, t, p, gamma, temp):
        seen.update(prior=p.clone(), q_t=t.clone())
        return real(s, t, p, gamma, temp)

    monkeypatch.setattr(ops, "temi_loss", spy)
    res = temi.train(x, nbrs, c, seed=seed, **kw)

    # the same step by hand, drawing the same random numbers in the same order
    g = torch.Generator().manual_seed(seed)
    student = temi.TEMIHeads(d, c, h, 8, 5, generator=g)
    init = {k_: p.detach().clone() for k_, p in student.named_parameters()}
    perm = torch.randperm(n, generator=g)
    draws = torch.randint(k, (n,), generator=g)
    pairs = torch.as_tensor(nbrs)[perm, draws]
    assert all(int(b) in nbrs[int(a)] and a != b for a, b in zip(perm, pairs))      # x' in kNN(x)
    z = torch.as_tensor(x)[torch.cat([perm, pairs])]
    q_t = torch.softmax(student(z).detach() / 0.1, -1).view(h, 2, n, c).transpose(0, 1)  # teacher == init
    prior = 0.9 * torch.full((h, c), 1 / c) + 0.1 * q_t.mean(dim=(0, 2))                  # before the loss
    torch.testing.assert_close(seen["prior"], prior)
    torch.testing.assert_close(seen["q_t"], q_t.contiguous())
    opt = torch.optim.AdamW(student.decay_groups(1e-4), lr=1e-2)
    loss = ops.ref_temi_loss(student(z).view(h, 2, n, c).transpose(0, 1), q_t, prior, 0.6, 0.1)
    loss.mean().backward()
    opt.step()
    best = int(torch.argmin(loss.detach()))
    assert res["best_head"] == best
    assert res["loss"] == pytest.approx(float(loss.detach()[best]), rel=1e-4)
    kept = dict(res["head"].net.named_parameters())
    for name, p in student.named_parameters():                 # teacher = 0.5 init + 0.5 student
        torch.testing.assert_close(kept[name][0], (0.5 * init[name] + 0.5 * p.detach())[best], rtol=1e-4, atol=1e-6)
    probs = res["probs"]
    assert probs.shape == (n, c) and np.allclose(probs.sum(1), 1, atol=1e-5)


def _blobs(sizes=(90, 75, 60, 50, 40), dim=16, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:len(sizes)]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_training_recovers_groups_and_is_deterministic(tmp_path):
    from sklearn.metrics import adjusted_mutual_info_score

    x, lab = _blobs(seed=1)
    nbrs = cosine_knn(x, 10)
    kw = dict(heads=4, epochs=100, batch_size=64, lr=1e-3, teacher_momentum=0.99, hidden=64, bottleneck=32, seed=3)
    a = temi.train(x, nbrs, 5, **kw)
    assign = a["probs"].argmax(1)
    assert adjusted_mutual_info_score(lab, assign) > 0.9 and len(np.unique(assign)) == 5
    assert len(a["loss_history"]) == 100 and a["loss_history"][-1] < a["loss_history"][0]
    b = temi.train(x, nbrs, 5, **kw)
    assert np.array_equal(a["probs"], b["probs"]) and a["head_losses"] == b["head_losses"]
    # save / load the kept head
    a["head"].save(tmp_path / "head.safetensors")
    head = heads.load_head(tmp_path / "head.safetensors")
    np.testing.assert_allclose(head.predict(x), a["probs"], rtol=1e-5, atol=1e-6)
    assert head.clusters == 5


def test_load_head_errors(tmp_path):
    from cedm.io import CedmError, save_tensors

    with pytest.raises(CedmError, match="missing head file"):
        heads.load_head(tmp_path / "nope.safetensors")
    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {"kind": "other"})
    with pytest.raises(CedmError, match="not a cedm cluster head"):
        heads.load_head(tmp_path / "x.safetensors")


def test_temi_loss_owns_the_prior_and_updates_it_before_the_loss(monkeypatch):
    """q~ <- m q~ + (1-m) mean(q_t) over views and batch, initialised to 1/C, before each loss."""
    h, b, c = 2, 3, 4
    fn = temi.TEMILoss(h, c, gamma=0.6, temperature=0.1, prior_momentum=0.5)
    torch.testing.assert_close(fn.prior, torch.full((h, c), 0.25))
    assert "prior" in fn.state_dict()                                    # saved with the loss
    g = torch.Generator().manual_seed(0)
    seen = []
    monkeypatch.setattr(ops, "temi_loss", lambda s, t, p, gamma, temp: seen.append(p.clone()) or
                        ops.ref_temi_loss(s, t, p, gamma, temp))
    want = torch.full((h, c), 0.25)
    for _ in range(2):
        logits = torch.randn(2, h, b, c, generator=g)
        q_t = torch.softmax(torch.randn(2, h, b, c, generator=g), -1)
        loss = fn(logits, q_t)
        want = 0.5 * want + 0.5 * q_t.mean(dim=(0, 2))
        torch.testing.assert_close(seen[-1], want)                       # the updated prior was used
        torch.testing.assert_close(loss, ops.ref_temi_loss(logits, q_t, want, 0.6, 0.1))
    torch.testing.assert_close(fn.prior, want)


def test_lr_per_step_is_the_official_schedule():
    """cosine: lr x batch/256, linear warm-up from 0 over min(warmup, epochs/20) epochs, then a
    half cosine to min_lr (DINO's cosine_scheduler); constant: lr everywhere."""
    lrs = temi.lr_per_step(1e-4, 512, epochs=200, steps=3, warmup_epochs=10, min_lr=1e-6)
    assert len(lrs) == 600 and lrs[0] == 0
    np.testing.assert_allclose(lrs[:30], np.linspace(0, 2e-4, 30))          # 10 epochs x 3 steps
    rest = np.arange(570)
    np.testing.assert_allclose(lrs[30:], 1e-6 + 0.5 * (2e-4 - 1e-6) * (1 + np.cos(np.pi * rest / 570)))
    assert lrs.max() == pytest.approx(2e-4) and lrs[-1] == pytest.approx(1e-6, rel=1e-2)
    short = temi.lr_per_step(1e-3, 256, epochs=40, steps=7, warmup_epochs=10)  # capped: 2 epochs
    assert short[13] == pytest.approx(1e-3) and short[12] < 1e-3 and np.all(np.diff(short[13:]) <= 0)
    np.testing.assert_array_equal(temi.lr_per_step(3e-3, 512, 4, 5, kind="constant"), np.full(20, 3e-3))
    with pytest.raises(Exception, match="lr schedule"):
        temi.lr_per_step(1e-3, 256, 4, 5, kind="step")


def _train_small(**kw):
    gen = torch.Generator().manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(64, 6, generator=gen), dim=1).numpy()
    return temi.train(x, cosine_knn(x, 4), 5, heads=2, batch_size=16, hidden=8, bottleneck=5, lr=1e-2,
                      seed=0, **kw)


def test_last_layer_frozen_in_the_first_epoch_and_gain_trains(monkeypatch):
    """freeze_last_layer=1: v and g receive no update during epoch 0 (4 steps), then they do;
    norm_last_layer=False trains g, True keeps g = 1 (and logits are cosines)."""
    seen = []
    real = temi.Trainer.step

    def spy(self, z, lr=None, freeze_last_layer=False):
        v, g = (p.detach().clone() for p in self.student.last_layer)
        w1 = self.student.w1.detach().clone()
        out = real(self, z, lr, freeze_last_layer)
        seen.append((freeze_last_layer, lr, torch.equal(v, self.student.v), torch.equal(g, self.student.g),
                     torch.equal(w1, self.student.w1)))
        return out

    monkeypatch.setattr(temi.Trainer, "step", spy)
    res = _train_small(epochs=3, freeze_last_layer=1, lr_schedule="constant", norm_last_layer=False)
    assert [s[0] for s in seen] == [True] * 4 + [False] * 8
    assert all(s[2] and s[3] and not s[4] for s in seen[:4])           # last layer fixed, MLP moves
    assert all(not s[2] and not s[3] for s in seen[4:])                # then v and g train
    assert not torch.equal(res["head"].net.g, torch.ones_like(res["head"].net.g))
    seen.clear()
    res = _train_small(epochs=2, freeze_last_layer=0, lr_schedule="constant", norm_last_layer=True)
    assert all(s[3] for s in seen) and not any(s[2] for s in seen)     # g fixed at 1, v trains
    assert torch.equal(res["head"].net.g, torch.ones_like(res["head"].net.g))
    seen.clear()
    _train_small(epochs=20, freeze_last_layer=0)                        # cosine: warm-up from 0
    lrs = [s[1] for s in seen]
    assert lrs[0] == 0 and lrs == temi.lr_per_step(1e-2, 16, 20, 4).tolist()


def test_official_training_is_deterministic_and_differs_from_the_fixed_gain_one():
    a, b = _train_small(epochs=6), _train_small(epochs=6)
    assert np.array_equal(a["probs"], b["probs"]) and a["loss_history"] == b["loss_history"]
    c = _train_small(epochs=6, norm_last_layer=True, lr_schedule="constant", freeze_last_layer=0)
    assert not np.array_equal(a["probs"], c["probs"])


def test_heads_saved_without_a_gain_still_load(tmp_path):
    """Heads saved before g existed (g was fixed at 1) load with g = 1 and the same outputs."""
    from cedm.io import load_tensors, save_tensors

    res = _train_small(epochs=2, norm_last_layer=True, lr_schedule="constant", freeze_last_layer=0)
    res["head"].save(tmp_path / "h.safetensors")
    t = load_tensors(tmp_path / "h.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        meta = f.metadata()
    save_tensors(tmp_path / "old.safetensors", {k: v for k, v in t.items() if k != "g"}, meta)
    old = heads.load_head(tmp_path / "old.safetensors")
    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    np.testing.assert_allclose(old.predict(x), res["head"].predict(x), rtol=1e-6, atol=1e-7)
    save_tensors(tmp_path / "bad.safetensors", {k: v for k, v in t.items() if k != "v"}, meta)
    from cedm.io import CedmError
    with pytest.raises(CedmError, match="corrupt head file"):
        heads.load_head(tmp_path / "bad.safetensors")
