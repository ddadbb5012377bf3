"""Downloads of pretrained weights: whether to try them at all (offline detection).

Without a network, the model hubs retry before they give up (the Hugging Face hub five times with
backoff: about a minute per file). So before a download is tried, `offline(url)` decides once per
process and host:
- CEDM_OFFLINE first: 1 never downloads, 0 always tries (no probe);
- for the Hugging Face hub only, HF_HUB_OFFLINE=1 (the hub library's own switch; it stays in force
  for the hub's downloads even with CEDM_OFFLINE=0);
- else whether the host (or the HTTPS proxy in between) takes a TCP connection within
  PROBE_SECONDS. When it does not, one line says so; when that host is the Hugging Face hub's,
  HF_HUB_OFFLINE is set for the process (what huggingface_hub, and so timm and open_clip, read),
  so the loaders answer from their caches at once or fail with their "not cached" error. Another
  host that does not answer (the CIFAR tarball's, torch-fidelity's GitHub release) leaves the
  Hugging Face hub alone.
Weights already in the local cache need no network: `timm_cached` / `open_clip_cached` look there
first (the loaders' own rules), and `loading(cached)` then reads them with no request (no probe,
no "no network" line); only a miss asks `offline()`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from typing import Iterator
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

PROBE_SECONDS = 3.0
ENV = ("CEDM_OFFLINE", "HF_HUB_OFFLINE")
_PROBED: dict[tuple[str, int], str | None] = {}     # (host, port) -> why it did not connect (None: it did)


def hf_endpoint() -> str:
    """The Hugging Face hub's URL (HF_ENDPOINT, as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def tcp_error(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to host:port failed within `timeout` s, DNS included (None: it connected).
    The lookup runs in a thread: a resolver that does not answer cannot hold the caller longer."""
    result: list = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer in {timeout:g} s"


def _target(url: str) -> tuple[str, int]:
    """Where a download of `url` connects first: its HTTPS/HTTP proxy when one applies, else its host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = getproxies().get(parts.scheme or "https")
    if proxy and not proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def _is_hf(url: str) -> bool:
    return (urlsplit(url).hostname or "").lower() == (urlsplit(hf_endpoint()).hostname or "").lower()


def offline(url: str | None = None, timeout: float = PROBE_SECONDS) -> bool:
    """True when no download of `url` (default: the Hugging Face hub) should be tried: CEDM_OFFLINE
    says so (0: always try), or, for the Hugging Face hub, HF_HUB_OFFLINE does, or its host does not
    answer (one line says so; for the Hugging Face hub, HF_HUB_OFFLINE is then set for this process)."""
    forced = _flag("CEDM_OFFLINE")
    if forced is not None:                              # 1: never download; 0: always try, no probe
        return forced
    url = url or hf_endpoint()
    hf = _is_hf(url)
    if hf and _flag("HF_HUB_OFFLINE"):
        return True
    host, port = _target(url)
    if (host, port) not in _PROBED:
        _PROBED[(host, port)] = why = tcp_error(host, port, timeout)
        if why is not None:
            then = ("working offline, as with HF_HUB_OFFLINE=1 (weights only from the local cache or a file"
                    if hf else f"no download from {urlsplit(url).hostname} (a local copy is needed")
            print(f"cedm: no network ({host}:{port}: {why}): {then}; CEDM_OFFLINE=0 tries to download anyway)",
                  file=sys.stderr)
    if _PROBED[(host, port)] is None:
        return False
    if hf:
        go_offline()
    return True


def go_offline() -> None:
    """HF_HUB_OFFLINE=1 for this process, also where huggingface_hub has already read it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def loading(cached: bool) -> Iterator[None]:
    """Around a loader that may download from the Hugging Face hub (timm, open_clip): weights that
    `cached` says are in the local cache are read from it with no request at all (HF_HUB_OFFLINE
    for the block only: online, the hub would first ask the server for a newer file, up to its
    10 s timeout where the network drops packets); on a miss, offline() decides first."""
    if not cached:
        offline()
        yield
        return
    constants = sys.modules.get("huggingface_hub.constants")
    env, flag = os.environ.get("HF_HUB_OFFLINE"), getattr(constants, "HF_HUB_OFFLINE", None)
    go_offline()
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env
        constants = sys.modules.get("huggingface_hub.constants")     # imported in the block, maybe
        if constants is not None:
            constants.HF_HUB_OFFLINE = bool(flag) if flag is not None else bool(_flag("HF_HUB_OFFLINE"))


def hf_cached(repo_id: str, filenames, revision: str | None = None) -> bool:
    """Whether one of `filenames` of Hugging Face repo `repo_id` is in the local hub cache
    (HF_HUB_CACHE), where hf_hub_download finds it offline."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in filenames)


def _safetensors_first(filename: str, default: str, safe_default: str) -> list[str]:
    """The files a loader asks the hub for, in order: a .safetensors alternative, then `filename`
    (timm/models/_hub.py and open_clip/pretrained.py, `_get_safe_alternatives`)."""
    if filename.endswith(".safetensors"):
        return [filename]
    if filename == default:
        return [safe_default, filename]
    return [filename[:-4] + ".safetensors", filename] if filename.endswith((".bin", ".pth")) else [filename]


def _torch_hub_file(url: str) -> bool:
    import torch

    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlsplit(url).path)))


def timm_cached(name: str) -> bool:
    """Whether timm.create_model(name, pretrained=True) finds its weights in a local cache: the
    Hugging Face hub's (its hf_hub_id) or torch hub's checkpoints folder (its url), as timm chooses
    between them (timm/models/_builder.py, _resolve_pretrained_source)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:                                # an unknown tag: timm's own error follows
        return False
    if cfg is None:
        return False
    if cfg.file or cfg.state_dict:
        return True
    url = cfg.url if isinstance(cfg.url, str) else None
    if cfg.source != "hf-hub" and url and os.environ.get("TIMM_USE_OLD_CACHE", "0") not in ("", "0") \
            and _torch_hub_file(url):
        return True
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = _safetensors_first(cfg.hf_hub_filename or "pytorch_model.bin", "pytorch_model.bin",
                                   "model.safetensors")
        return hf_cached(repo, files, revision or None)
    return bool(url) and _torch_hub_file(url)


def open_clip_cached(model: str, tag: str) -> bool:
    """Whether open_clip.create_model_and_transforms(model, pretrained=tag) finds its weights in a
    local cache: the Hugging Face hub's (its hf_hub entry, preferred), else ~/.cache/clip (its url),
    as open_clip/pretrained.py's download_pretrained chooses."""
    from open_clip import get_pretrained_cfg

    cfg = get_pretrained_cfg(model.replace("/", "-"), tag)
    if not cfg:
        return False
    if cfg.get("file"):
        return True
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        files = _safetensors_first(filename or "open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin",
                                   "open_clip_model.safetensors")
        return hf_cached(repo, files)
    url = cfg.get("url")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))
