"""cedm.evaluate: Fréchet distances through torch-fidelity, fallbacks, 1-NN AUROC, the stage."""
import numpy as np
import pytest
import torch

from cedm import evaluate
from cedm.io import CedmError


def _stats(x):
    return evaluate.feature_statistics(x)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_of_two_sets_positive():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(loc=0.5, size=(400, 16))
    assert abs(evaluate.frechet_distance(_stats(a), _stats(a))) < 1e-6
    d = evaluate.frechet_distance(_stats(a), _stats(b))
    # ||mu_a - mu_b||^2 is about 16 * 0.25 = 4; the covariances match, so FD is about 4.
    assert 3.0 < d < 5.0


def test_frechet_distance_grows_with_the_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8))
    d = [evaluate.frechet_distance(_stats(a), _stats(a + s)) for s in (0.1, 0.5, 1.0)]
    assert d[0] < d[1] < d[2]


def test_one_nn_auroc_tells_copies_from_outliers():
    rng = np.random.default_rng(0)
    real = lambda n: np.concatenate([rng.normal(size=(n, 5)), 0.05 * rng.normal(size=(n, 5))], 1)
    train, held = real(500), real(100)
    # Off the data manifold in cosine terms: directions the data never takes.
    far = np.concatenate([0.05 * rng.normal(size=(100, 5)), rng.normal(size=(100, 5))], 1)
    copies = train[:100] + 1e-4 * rng.normal(size=(100, 10))  # memorised training images
    assert evaluate.one_nn_auroc(train, far, held) > 0.9
    assert evaluate.one_nn_auroc(train, copies, held) < 0.1


@pytest.mark.slow
def test_inception_path_of_torch_fidelity_with_a_local_weight_file(inception_weights_file):
    path = inception_weights_file
    ext = evaluate.inception_extractor(str(path), torch.device("cpu"))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 3, 0, 255).astype(np.uint8)   # darker images
    fa, fb = ext(a), ext(b)
    assert fa.shape == (24, 2048) and np.isfinite(fa).all()
    assert abs(evaluate.frechet_distance(_stats(fa), _stats(fa))) < 1e-3
    assert evaluate.frechet_distance(_stats(fa), _stats(fb)) > 1e-3


def test_missing_weights_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CEDM_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CedmError, match="no Inception-v3 weights"):
        evaluate.inception_extractor(None, torch.device("cpu"))
    with pytest.raises(CedmError, match="no such file"):
        evaluate.inception_extractor(str(tmp_path / "nope.pth"), torch.device("cpu"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CedmError, match="could not load Inception-v3 weights"):
        evaluate.inception_extractor(str(bad), torch.device("cpu"))
    with pytest.raises(CedmError, match="no DINOv2 weights"):
        evaluate.dinov2_extractor(None, torch.device("cpu"))
