"""Every TTT attention path equals the masked-SDPA reference, gradients included, and the mask is the documented one."""

import math

import pytest
import torch

from eaglecache.train.attention import KeyCache, resolve_implementation, ttt_attention, ttt_mask


def random_inputs(steps, dtype, batch=2, heads=4, kv_heads=2, length=11, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, length, h, dim, generator=gen).to(dtype).transpose(1, 2)  # noqa: E731
    q = make(heads).requires_grad_()  # strided like the model's [B, T, h, d] -> [B, h, T, d]
    keys = [make(kv_heads).requires_grad_() for _ in range(steps)]
    values = [make(kv_heads).requires_grad_() for _ in range(steps)]
    grad_out = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    return q, keys, values, grad_out


def attend(q, keys, values, implementation):
    cache = KeyCache()
    for k, v in zip(keys, values):
        cache = cache.append(k, v, implementation)
    return ttt_attention(q, cache, implementation)


def test_mask_is_causal_on_step_zero_and_diagonal_on_later_steps():
    mask = ttt_mask(4, 3, torch.device("cpu"))
    assert mask.shape == (4, 12)
    assert torch.equal(mask[:, :4], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(mask[:, 4:8], torch.eye(4, dtype=torch.bool))
    assert torch.equal(mask[:, 8:], torch.eye(4, dtype=torch.bool))


def test_reference_equals_attention_written_out_per_query():
    q, keys, values, _ = random_inputs(3, torch.float64, batch=1, heads=2, kv_heads=1, length=5, dim=4)
    out = attend(q, keys, values, "reference")
    for t in range(5):
        for head in range(2):
            ks = [keys[0][0, 0, s] for s in range(t + 1)] + [keys[j][0, 0, t] for j in (1, 2)]
            vs = [values[0][0, 0, s] for s in range(t + 1)] + [values[j][0, 0, t] for j in (1, 2)]
            att = torch.softmax(torch.stack(ks) @ q[0, head, t] / math.sqrt(4), 0)
            assert torch.allclose(out[0, head, t], att @ torch.stack(vs), atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_split_kernel_matches_reference_with_gradients(steps, dtype, tol, kv_heads):
    q, keys, values, grad_out = random_inputs(steps, dtype, kv_heads=kv_heads)
    inputs = [q, *keys, *values]
    ref = attend(q, keys, values, "reference")
    ref_grads = torch.autograd.grad((ref.float() * grad_out.float()).sum(), inputs)
    out = attend(q, keys, values, "split")
    grads = torch.autograd.grad((out.float() * grad_out.float()).sum(), inputs)
    assert (out.float() - ref.float()).abs().max() <= tol
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == rg.dtype and g.shape == rg.shape
        assert (g.float() - rg.float()).abs().max() <= tol * max(1.0, rg.float().abs().max().item())


@pytest.mark.parametrize("steps", [1, 3])
def test_flex_forward_matches_reference_on_cpu(steps):
    """FlexAttention has no CPU backward in torch 2.13; its gradients are checked on CUDA below."""
    q, keys, values, _ = random_inputs(steps, torch.float32)
    with torch.no_grad():
        ref = attend(q, keys, values, "reference")
        out = attend(q.detach(), [k.detach() for k in keys], [v.detach() for v in values], "flex")
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_matches_reference_with_gradients_on_cuda():
    q, keys, values, grad_out = random_inputs(3, torch.float32, length=130)
    to_cuda = lambda x: x.detach().cuda().requires_grad_()  # noqa: E731
    q, keys, values, grad_out = to_cuda(q), [to_cuda(k) for k in keys], [to_cuda(v) for v in values], grad_out.cuda()
    inputs = [q, *keys, *values]
    ref_grads = torch.autograd.grad((attend(q, keys, values, "reference") * grad_out).sum(), inputs)
    grads = torch.autograd.grad((attend(q, keys, values, "flex") * grad_out).sum(), inputs)
    for g, rg in zip(grads, ref_grads):
        assert (g - rg).abs().max() < 1e-4


def test_auto_picks_split_on_cpu_and_rejects_split_elsewhere():
    assert resolve_implementation("auto", torch.device("cpu")) == "split"
    assert resolve_implementation("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError):
        resolve_implementation("split", torch.device("cuda"))
    with pytest.raises(ValueError):
        resolve_implementation("fast", torch.device("cpu"))
