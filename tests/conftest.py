"""Shared test setup: offline hub (no 50 s hangs), headless plots, deterministic CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CEDM_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine (CUDA kernels compiled, not run)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def one_thread():
    """One torch thread for the test: small work runs as fast on one, and on shared cores a second
    OpenMP thread mostly spins. Restores the setting afterwards. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def inception_weights_file(tmp_path, monkeypatch):
    """A locally made Inception-v3 weight file in torch-fidelity's format (random weights with a
    scale-preserving init, so the 2048-d features do not vanish): exercises the real torch-fidelity
    FID path where the real weights cannot be downloaded."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    return path
