"""TEMIHeads: the CPU head chunks compute what one batched computation computes (to fp32
rounding), forward and backward; the chunk size follows the activation budget and the device."""
import pytest
import torch

from cedm.temi import TEMIHeads

pytestmark = pytest.mark.usefixtures("one_thread")


def _heads(H=7, D=24, hidden=16, bottleneck=8, C=5, seed=0):
    return TEMIHeads(D, C, H, hidden, bottleneck, generator=torch.Generator().manual_seed(seed))


def _fwd_bwd(heads, z, k):
    heads.head_chunk = k
    heads.zero_grad(set_to_none=True)
    out = heads(z)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in heads.named_parameters()}


@pytest.mark.parametrize("k", [1, 3, 4, 7])
def test_chunks_match_one_batched_computation(k):
    heads = _heads()
    z = torch.nn.functional.normalize(torch.randn(10, 24, generator=torch.Generator().manual_seed(1)), dim=1)
    want_out, want_grads = _fwd_bwd(heads, z, 7)   # all 7 heads at once
    out, grads = _fwd_bwd(heads, z, k)             # chunks of k (3: 3+3+1, a ragged last chunk)
    assert out.shape == (7, 10, 5)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_each_head_is_the_single_head_network():
    heads = _heads(H=5)
    z = torch.randn(6, 24, generator=torch.Generator().manual_seed(2))
    heads.head_chunk = 2
    out = heads(z)
    for i in range(5):
        torch.testing.assert_close(out[i], heads.select(i)(z)[0], rtol=1e-5, atol=1e-6)


def test_chunk_size_follows_budget_device_and_override():
    heads = TEMIHeads(768, 100, 50, 512, 256)
    k = heads.chunk_heads(1024)  # the paper's step: 2 x 512 pairs
    assert 1 <= k < 50 and k * 1024 * 512 * 4 <= TEMIHeads.CHUNK_BYTES
    assert heads.chunk_heads(8) == 50          # small batches: all heads fit the budget
    heads.head_chunk = 7
    assert heads.chunk_heads(1024) == 7
    heads.head_chunk = 500
    assert heads.chunk_heads(1024) == 50
    # off the CPU (a GPU; here the meta device): one batched computation for every batch size
    meta = TEMIHeads(768, 100, 50, 512, 256).to("meta")
    assert meta.chunk_heads(1024) == 50 and meta.chunk_heads(1 << 20) == 50
    assert meta(torch.empty(1024, 768, device="meta")).shape == (50, 1024, 100)
