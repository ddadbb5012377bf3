"""cedm/hub.py: which download is tried (CEDM_OFFLINE first; HF_HUB_OFFLINE only for the Hugging
Face hub; a failed probe of another host leaves the hub alone) and weights found in the local cache
first, with no probe and no request (the loaders' own cache rules: timm/models/_builder.py
`_resolve_pretrained_source` and timm/models/_hub.py `load_state_dict_from_hf`; open_clip/pretrained.py
`download_pretrained`; huggingface_hub's cache layout as `try_to_load_from_cache` reads it)."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from cedm import hub


@pytest.fixture()
def online(monkeypatch):
    """No offline flag (tests/conftest.py sets both), no probe made yet."""
    import huggingface_hub.constants as c

    monkeypatch.delenv("CEDM_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_PROBED", {})


@pytest.fixture()
def connections(monkeypatch):
    """Every TCP connection this process attempts (each refused at once): none means no request."""
    made = []

    def create_connection(address, *a, **k):
        made.append(address)
        raise ConnectionRefusedError(111, "Connection refused (test)")

    def connect(self, address):
        made.append(address)
        raise ConnectionRefusedError(111, "Connection refused (test)")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return made


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache (HF_HUB_CACHE) and torch hub folder, both under tmp_path."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch"))
    yield cache
    torch.hub.set_dir(old)


def cache_entry(cache, repo: str, filename: str, data: bytes = b"x", commit: str = "0" * 40):
    """A file as huggingface_hub stores a download: the blob, a snapshot link, refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    blob = folder / "blobs" / f"blob-{filename}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snap = folder / "snapshots" / commit / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(blob)
    return snap


# ----------------------------------------------------------------------------------------------
# Which download is tried

def test_cedm_offline_decides_first_and_hf_hub_offline_is_for_the_hub_alone(online, monkeypatch, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cifar = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert hub.offline() is True and connections == []          # the hub: HF_HUB_OFFLINE, no probe
    assert hub.offline(cifar) is True and connections == [hub._target(cifar)]   # probed, not blocked
    monkeypatch.setenv("CEDM_OFFLINE", "0")                    # always try: no probe, not even the hub's
    monkeypatch.setattr(hub, "_PROBED", {})
    assert hub.offline() is False and hub.offline(cifar) is False and len(connections) == 1
    monkeypatch.setenv("CEDM_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub.offline() is True and hub.offline(cifar) is True and len(connections) == 1


def test_a_failed_probe_of_another_host_leaves_the_hub_online(online, monkeypatch, capsys):
    import huggingface_hub.constants as c

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert hub.offline(f"https://127.0.0.1:{closed}/weights.pth") is True
    err = capsys.readouterr().err
    assert err.startswith(f"cedm: no network (127.0.0.1:{closed}: ") and "no download from 127.0.0.1" in err
    assert "HF_HUB_OFFLINE" not in os.environ and c.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_ENDPOINT", f"https://localhost:{closed}")    # the hub itself does not answer
    assert hub.offline() is True
    assert "working offline, as with HF_HUB_OFFLINE=1" in capsys.readouterr().err
    assert os.environ["HF_HUB_OFFLINE"] == "1" and c.HF_HUB_OFFLINE is True


# ----------------------------------------------------------------------------------------------
# The cache first

def test_timm_weights_are_found_in_the_hub_cache_as_timm_asks_for_them(hf_cache, monkeypatch):
    name, repo = "vit_base_patch16_224.dino", "timm/vit_base_patch16_224.dino"
    assert hub.timm_cached(name) is False
    entry = cache_entry(hf_cache, repo, "pytorch_model.bin")     # the file timm asks for
    assert hub.timm_cached(name) is True
    entry.unlink()
    cache_entry(hf_cache, repo, "model.safetensors")             # its safetensors alternative, asked first
    assert hub.timm_cached(name) is True
    assert hub.timm_cached("vit_base_patch16_224.augreg2_in21k_ft_in1k") is False    # another tag
    assert hub.timm_cached("vit_tiny_patch16_224") is False      # the default tag's repo, not cached
    assert hub.timm_cached("vit_base_patch16_224.no_such_tag") is False
    # TIMM_USE_OLD_CACHE: timm prefers its url's file in torch hub's checkpoints folder
    monkeypatch.setenv("TIMM_USE_OLD_CACHE", "1")
    tiny = "vit_tiny_patch16_224"
    from timm.models import get_pretrained_cfg

    url = get_pretrained_cfg(tiny).url
    assert hub.timm_cached(tiny) is False
    ckpt = hf_cache.parent / "torch" / "checkpoints" / url.rsplit("/", 1)[1]
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert hub.timm_cached(tiny) is True


def test_open_clip_weights_are_found_in_the_hub_cache(hf_cache):
    model, tag = "ViT-bigG-14", "laion2b_s39b_b160k"
    assert hub.open_clip_cached(model, tag) is False
    cache_entry(hf_cache, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "open_clip_model.safetensors")
    assert hub.open_clip_cached(model, tag) is True
    assert hub.open_clip_cached(model, "laion2b_s39b_b160k".upper()) is True   # open_clip's tag cleaning
    assert hub.open_clip_cached("ViT-B-16", "openai") is False
    assert hub.open_clip_cached(model, "no-such-tag") is False


def test_cached_timm_weights_load_with_no_probe_and_no_request(hf_cache, online, connections, capsys):
    """A backbone in the cache, no offline flag, no network: `cedm features`' loader reads it with
    no connection attempted (it used to probe first, up to 3 s and a "no network" line, and timm
    then asked the hub for a newer file); a miss still probes, and works offline from then on."""
    import huggingface_hub.constants as c
    import timm
    from safetensors.torch import save_file

    from cedm.features import _create_timm

    name = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    made = timm.create_model(name, pretrained=False)
    snap = cache_entry(hf_cache, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")
    snap.unlink()
    save_file({k: v.contiguous() for k, v in made.state_dict().items()}, str(snap))
    model = _create_timm(name)
    assert connections == [] and capsys.readouterr().err == ""
    assert torch.equal(model.patch_embed.proj.weight, made.patch_embed.proj.weight)
    assert "HF_HUB_OFFLINE" not in os.environ and c.HF_HUB_OFFLINE is False   # only for the load
    from cedm.io import CedmError

    with pytest.raises(CedmError, match="cannot load pretrained weights for vit_small_patch16_224"):
        _create_timm("vit_small_patch16_224")                     # a miss: the probe, then offline
    host, port = hub._target(hub.hf_endpoint())
    assert connections == [(host, port)]
    assert f"cedm: no network ({host}:{port}" in capsys.readouterr().err and c.HF_HUB_OFFLINE is True
