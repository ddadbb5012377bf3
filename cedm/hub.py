"""Downloads of pretrained weights: whether to try them at all (offline detection).

Without a network, the model hubs retry before they give up (the Hugging Face hub five times with
backoff: about a minute per file). So before a download is tried, `offline(url)` decides once per
process and host: offline when CEDM_OFFLINE or HF_HUB_OFFLINE says so, else when the host (or the
HTTPS proxy in between) does not take a TCP connection within PROBE_SECONDS. When no network is
found, it says so in one line and sets HF_HUB_OFFLINE for the process (what huggingface_hub, and so
timm and open_clip, read), so the loaders answer from their caches at once or fail with their
"not cached" error. CEDM_OFFLINE=0 skips the probe and always tries the download.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
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


def offline(url: str | None = None, timeout: float = PROBE_SECONDS) -> bool:
    """True when no download of `url` (default: the Hugging Face hub) should be tried: an offline
    flag is set, or its host does not answer (then HF_HUB_OFFLINE is set for this process and one
    line says so)."""
    if any(_flag(v) for v in ENV):
        return True
    if _flag("CEDM_OFFLINE") is False:                  # CEDM_OFFLINE=0: always try the download
        return False
    host, port = _target(url or hf_endpoint())
    if (host, port) not in _PROBED:
        _PROBED[(host, port)] = why = tcp_error(host, port, timeout)
        if why is not None:
            print(f"cedm: no network ({host}:{port}: {why}): working offline, as with HF_HUB_OFFLINE=1 "
                  f"(weights only from the local cache or a file; CEDM_OFFLINE=0 tries to download anyway)",
                  file=sys.stderr)
            go_offline()
    return _PROBED[(host, port)] is not None


def go_offline() -> None:
    """HF_HUB_OFFLINE=1 for this process, also where huggingface_hub has already read it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
