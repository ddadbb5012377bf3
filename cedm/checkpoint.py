"""Training state: checkpoint files, RNG state and the resume policy (no pickles of objects).

train/<tag>/ holds network.safetensors (EMA weights) + network.json, snapshots/ (the EMA weights
along training, with --snapshot-every-mimg), and state.pt: the full
training state (model, EMA, optimizer, grad scaler, step, RNG states, the config and input
hashes it was made with), loaded with torch.load(weights_only=True). Each file is written
atomically, so a kill during a write leaves the previous checkpoint (and a stale *.tmp that
the stage layer removes on the next run).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from cedm.io import CedmError, atomic_path, save_json, save_tensors


def rng_state() -> dict:
    """torch, numpy, python (and CUDA) global RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
           "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((s["python"]["version"], tuple(s["python"]["state"]), s["python"]["gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out: Path, net, ema, meta: dict, state: dict | None) -> None:
    """network.safetensors (EMA) + network.json, then state.pt; each written atomically."""
    save_tensors(out / "network.safetensors", ema.state_dict(), metadata={"format": "cedm-edm"})
    save_json(out / "network.json", meta)
    if state is not None:
        with atomic_path(out / "state.pt") as tmp:
            torch.save(state, tmp)


SNAPSHOTS = "snapshots"


def snapshot_path(out: Path, nimg: int) -> Path:
    """train/<tag>/snapshots/ema-<nimg>.safetensors: the EMA weights after `nimg` training images."""
    return Path(out) / SNAPSHOTS / f"ema-{int(nimg):010d}.safetensors"


def save_snapshot(out: Path, ema, nimg: int) -> None:
    """A snapshot of the EMA weights (EDM's network-snapshot-*.pkl, as safetensors), atomically."""
    save_tensors(snapshot_path(out, nimg), ema.state_dict(), metadata={"format": "cedm-edm", "nimg": int(nimg)})


def snapshots(train_dir: Path) -> list[tuple[int, Path]]:
    """[(nimg, path)] of a training run's snapshots, by nimg."""
    found = []
    for p in (Path(train_dir) / SNAPSHOTS).glob("ema-*.safetensors"):
        try:
            found.append((int(p.name[4:-len(".safetensors")]), p))
        except ValueError:
            continue
    return sorted(found)


def load_state(path: Path) -> dict:
    """state.pt, or a one-line CedmError for a torn or foreign file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say so in one line, not a pickle traceback
        text = str(e).strip()
        first = text.splitlines()[0][:200] if text else type(e).__name__
        raise CedmError(f"cannot read training state {path} ({type(e).__name__}: {first}); "
                        f"delete it or use --force") from None


def resume_policy(saved: dict | None, config: dict, inputs: dict, nimg_target: float,
                  force: bool) -> tuple[str, str]:
    """What to do with a saved training state: ("resume" | "restart" | "refuse", reason).

    saved: the state's {"config", "inputs", "nimg"} (None: no state). Another input (e.g. the
    clustering was redone) makes the state stale: restart. Another config: refuse, unless
    --force, which restarts, or resumes when only the budget grew past the images seen
    (extending a run). The same config and inputs: resume (a forced redo restarts).
    """
    if saved is None:
        return "restart", "no saved state"
    if saved.get("inputs", inputs) != inputs:
        changed = sorted(k for k in set(saved.get("inputs") or {}) | set(inputs)
                         if (saved.get("inputs") or {}).get(k) != inputs.get(k))
        return "restart", f"its inputs changed ({', '.join(changed)})"
    old = saved.get("config") or {}
    if old == config:
        return ("restart", "--force") if force else ("resume", "same config and inputs")
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if not force:
        return "refuse", f"holds an unfinished run with another config (differs in: {', '.join(diff)})"
    if diff == ["mimg"] and saved.get("nimg", 0) < nimg_target:
        return "resume", "the budget grew (--mimg): extending"
    return "restart", "--force"
