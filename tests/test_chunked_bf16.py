"""Every chunked function takes bf16 hidden states with a float32 head (bf16 autocast over float32
master weights): the matmul in bf16, the softmax math in float32, the hidden's gradient bf16 and
the head's float32 (accumulated in float32, not rounded through bf16), values and gradients within
bf16 rounding of the float32 computation."""

import pytest
import torch

from opd.losses.chunked import chunked_divergence, chunked_divergence_loss
from opd.losses.selective import chunked_logsumexp, logits_at_ids, token_logp, token_logp_and_stats
from opd.losses.sparse import chunked_sparse_divergence

pytestmark = pytest.mark.usefixtures("loss_kernel")  # each test under both chunk kernels (conftest)

N, H, V = 24, 16, 300
REL, GRAD_REL = 3e-2, 5e-2  # bf16 has 8 significant bits: logits to ~0.4%, a few of them summed


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g)
    W = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    b = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    t = 2.0 * torch.randn(N, V, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)
    return h, W, b, t, ids


def _ids_K(k=5):
    return torch.randint(0, V, (N, k), generator=torch.Generator().manual_seed(1))


def _sparse(h, W, b, ids, **kw):
    logp = torch.randn(N, 5, generator=torch.Generator().manual_seed(2)).log_softmax(-1) - 0.5
    return chunked_sparse_divergence(h, W, _ids_K(), logp, "rkl", bias_V=b, chunk_size=7, **kw)


CASES = {
    "fkl": lambda h, W, b, t, ids: chunked_divergence(h, W, t, "fkl", bias_V=b, chunk_size=7),
    "rkl_clip": lambda h, W, b, t, ids: chunked_divergence(h, W, t, "rkl", bias_V=b, chunk_size=7, entry_clip=0.01),
    "jsd_floor": lambda h, W, b, t, ids: chunked_divergence(h, W, t, "jsd", beta=0.9, bias_V=b, chunk_size=7, teacher_floor=-100.0),
    "jsd_mask": lambda h, W, b, t, ids: chunked_divergence(h, W, t, "jsd", bias_V=b, chunk_size=7, expected_grad=torch.ones(N)),
    "topk_support": lambda h, W, b, t, ids: chunked_divergence(h, W, t, "rkl", bias_V=b, chunk_size=8, support="teacher_topk", k=4),
    "teacher_head": lambda h, W, b, t, ids: chunked_divergence(h, W, (h.detach().flip(0), W.detach() * 2), "rkl", bias_V=b, chunk_size=7),
    "fused_loss": lambda h, W, b, t, ids: chunked_divergence_loss(h, W, t, "jsd", torch.full((N,), 1 / N), bias_V=b, chunk_size=7)[0],
    "token_logp": lambda h, W, b, t, ids: token_logp(h, W, ids, bias_V=b, chunk_size=7),
    "entropy": lambda h, W, b, t, ids: token_logp_and_stats(h.detach(), W.detach(), ids, topk=3, bias_V=b.detach(), chunk_size=7)[1],
    "logits_at_ids": lambda h, W, b, t, ids: logits_at_ids(h, W, _ids_K(), bias_V=b),
    "logsumexp": lambda h, W, b, t, ids: sum(chunked_logsumexp(h, W, bias_V=b, temperature=0.8, exclude_ids_NK=_ids_K(), chunk_size=7)[:2]),
    "sparse_tail": lambda h, W, b, t, ids: _sparse(h, W, b, ids, tail_bucket=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_hidden_with_a_float32_head_tracks_float32(case):
    fn = CASES[case]
    h, W, b, t, ids = _inputs()
    h16 = h.bfloat16().requires_grad_()
    h32 = h16.detach().float().requires_grad_()  # the same inputs in float32: only the matmul's precision differs
    ref = fn(h32, W, b, t, ids)
    got = fn(h16, W, b, t, ids)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=REL, atol=REL * float(ref.detach().abs().mean()))
    if not ref.requires_grad:
        return
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    g_ref = torch.autograd.grad((ref * up).sum(), (h32, W, b))
    g_h, g_w, g_b = torch.autograd.grad((got * up).sum(), (h16, W, b))
    assert (g_h.dtype, g_w.dtype, g_b.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    for a, r in zip((g_h.float(), g_w, g_b), g_ref):
        assert float((a - r).norm() / r.norm().clamp(min=1e-30)) <= GRAD_REL, case
    assert bool((g_w != g_w.bfloat16().float()).any()), "the weight's gradient was rounded through bf16"
