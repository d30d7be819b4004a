"""Chunked (memory-lean) divergences: equal to the unchunked form, values and gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.losses.chunked import chunked_divergence, chunked_divergence_loss, default_chunk_size
from opd.losses.divergence import divergence

pytestmark = pytest.mark.usefixtures("loss_kernel")  # each test under both chunk kernels (conftest)

N, H, V = 7, 5, 13
CHUNKS = [1, 3, 7, 10, None]  # 3 does not divide N=7; 10 > N; None is the default
CASES = [  # (kind, beta, entry_clip)
    ("fkl", 0.5, None), ("rkl", 0.5, None), ("jsd", 0.3, None), ("jsd", 0.0, None),
    ("jsd", 1.0, None), ("fkl", 0.5, 0.02), ("rkl", 0.5, 0.02), ("jsd", 0.5, 0.01),
]  # fmt: skip
TOL = {torch.float64: dict(rtol=1e-6, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _randn(shape, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _inputs(dtype=torch.float64, seed=0, scale=1.0):
    h = _randn((N, H), seed, scale, dtype).requires_grad_()
    W = _randn((V, H), seed + 1, 1.0, dtype).requires_grad_()
    b = _randn((V,), seed + 2, 1.0, dtype).requires_grad_()
    t = _randn((N, V), seed + 3, 2.0, dtype)
    g = _randn((N,), seed + 4, 1.0, dtype)
    return h, W, b, t, g


def _reference(h, W, b, teacher_logits, g, **kw):
    """The unchunked form: materialize the logits, autograd through ``divergence``."""
    value = divergence(h @ W.T + b, teacher_logits, **kw)
    return (value.detach(), *torch.autograd.grad((value * g).sum(), (h, W, b)))


def _recomputed(h, W, b, teacher, g, chunk_size, **kw):
    value = chunked_divergence(h, W, teacher, bias_V=b, chunk_size=chunk_size, **kw)
    return (value.detach(), *torch.autograd.grad((value * g).sum(), (h, W, b)))


def _fused(h, W, b, teacher, g, chunk_size, **kw):
    loss, value = chunked_divergence_loss(h, W, teacher, weights_N=g, bias_V=b,
                                          chunk_size=chunk_size, **kw)  # fmt: skip
    assert not value.requires_grad
    torch.testing.assert_close(loss, (value * g).sum())
    return (value, *torch.autograd.grad(loss, (h, W, b)))


def _assert_all_close(got, ref, tol):
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,beta,clip", CASES)
@pytest.mark.parametrize("variant", [_recomputed, _fused])
def test_equals_unchunked(dtype, kind, beta, clip, variant):
    h, W, b, t, g = _inputs(dtype)
    kw = dict(kind=kind, beta=beta, temperature=0.7, entry_clip=clip)
    ref = _reference(h, W, b, t, g, **kw)
    for chunk_size in CHUNKS:
        _assert_all_close(variant(h, W, b, t, g, chunk_size, **kw), ref, TOL[dtype])


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("variant", [_recomputed, _fused])
def test_teacher_as_hidden_and_lm_head(kind, variant):
    h, W, b, _, g = _inputs()
    th, tW, tb = _randn((N, 4), 10), _randn((V, 4), 11, 2.0), _randn((V,), 12)
    ref = _reference(h, W, b, th @ tW.T + tb, g, kind=kind)
    for chunk_size in (2, 5):
        got = variant(h, W, b, (th, tW, tb), g, chunk_size, kind=kind)
        _assert_all_close(got, ref, TOL[torch.float64])
    got = variant(h, W, b, (th, tW), g, 3, kind=kind)  # no teacher bias
    _assert_all_close(got, _reference(h, W, b, th @ tW.T, g, kind=kind), TOL[torch.float64])


@pytest.mark.parametrize("support", ["teacher_topk", "student_topk"])
@pytest.mark.parametrize("renormalize", ["both", "teacher", "none"])
@pytest.mark.parametrize("variant", [_recomputed, _fused])
def test_topk_support(support, renormalize, variant):
    h, W, b, t, g = _inputs(seed=3)
    kw = dict(kind="rkl", support=support, k=4, renormalize=renormalize, entry_clip=0.1)
    ref = _reference(h, W, b, t, g, **kw)
    for chunk_size in (3, 7):
        _assert_all_close(variant(h, W, b, t, g, chunk_size, **kw), ref, TOL[torch.float64])


def test_leading_dims_no_bias_and_partial_grads():
    h, W, _, t, g = _inputs(seed=4)
    h3, t3 = h.detach()[None].clone().requires_grad_(), t[None]
    value = chunked_divergence(h3, W, t3, "jsd", chunk_size=3)
    assert value.shape == (1, N)
    ref = divergence(h3 @ W.T, t3, "jsd")
    torch.testing.assert_close(value, ref)
    got = torch.autograd.grad((value * g).sum(), (h3, W))
    for a, r in zip(got, torch.autograd.grad((ref * g).sum(), (h3, W))):
        torch.testing.assert_close(a, r)
    # only W requires grad: hidden gets none, W's gradient is still right
    hd = h.detach()
    loss, _ = chunked_divergence_loss(hd, W, t, "rkl", g, chunk_size=2)
    (gw,) = torch.autograd.grad(loss, W)
    (rw,) = torch.autograd.grad((divergence(hd @ W.T, t, "rkl") * g).sum(), W)
    torch.testing.assert_close(gw, rw)


def test_fused_loss_scales_with_upstream_and_weights_get_values():
    h, W, b, t, _ = _inputs(seed=5)
    w = _randn((N,), 6).requires_grad_()
    loss, values = chunked_divergence_loss(h, W, t, "fkl", w, bias_V=b, chunk_size=4)
    gh, gw_ = torch.autograd.grad(3.0 * loss, (h, w))
    ref = divergence(h @ W.T + b, t, "fkl")
    rh, rw = torch.autograd.grad(3.0 * (ref * w).sum(), (h, w))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw_, rw)
    torch.testing.assert_close(gw_, 3.0 * values)


def test_no_grad_logging_and_teacher_gets_no_gradient():
    h, W, b, t, _ = _inputs(seed=7)
    with torch.no_grad():
        value = chunked_divergence(h, W, t, "rkl", bias_V=b, chunk_size=2)
    torch.testing.assert_close(value, divergence(h @ W.T + b, t, "rkl").detach())
    t = t.clone().requires_grad_()
    chunked_divergence(h, W, t, "rkl", chunk_size=2).sum().backward()
    assert t.grad is None and h.grad is not None


def test_fused_loss_under_no_grad_makes_no_gradients():
    h, W, b, t, g = _inputs(seed=8)
    with torch.no_grad():
        loss, values = chunked_divergence_loss(h, W, t, "jsd", g, bias_V=b, chunk_size=3)
    assert not loss.requires_grad
    ref = divergence(h @ W.T + b, t, "jsd").detach()
    torch.testing.assert_close(values, ref)
    torch.testing.assert_close(loss, (ref * g).sum())


def test_no_tokens():
    h, W, b, t, _ = _inputs()
    h0 = h.detach()[:0].requires_grad_()
    value = chunked_divergence(h0, W, t[:0], "rkl", bias_V=b)
    assert value.shape == (0,)
    value.sum().backward()
    assert W.grad.eq(0).all() and h0.grad.shape == (0, H)


def test_default_chunk_size():
    assert default_chunk_size(151_936) == 110 == default_chunk_size(151_936, "cpu")
    assert default_chunk_size(151_936, "cuda") == default_chunk_size(151_936, torch.device("cuda", 1)) == 441
    assert default_chunk_size(13) > N


def test_errors():
    h, W, b, t, g = _inputs()
    with pytest.raises(ValueError, match="vocabularies"):
        chunked_divergence(h, W, (h, W[:5]), "rkl")
    with pytest.raises(ValueError, match="teacher logits"):
        chunked_divergence(h, W, t[:, :5], "rkl")
    # hidden states in another dtype than the head (autocast) are accepted: the head is cast
    torch.testing.assert_close(chunked_divergence(h.float(), W, t, "rkl").double(), chunked_divergence(h, W, t, "rkl"),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(h, W, t, "rkl", chunk_size=0)
    with pytest.raises(ValueError, match="weights"):
        chunked_divergence_loss(h, W, t, "rkl", g[:3])


@given(
    seed=st.integers(0, 2**30),
    scale=st.sampled_from([1.0, 1e2, 1e4]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    kind=st.sampled_from(["fkl", "rkl", "jsd"]),
    clip=st.sampled_from([None, 0.05]),
    masked=st.booleans(),
    fused=st.booleans(),
    n=st.integers(1, 5),
)
@settings(max_examples=40, deadline=None)
def test_hostile_inputs_are_finite(seed, scale, dtype, kind, clip, masked, fused, n):
    """Peaked student (hidden scaled up to 1e4), -inf teacher logits, one token, bf16."""
    h = _randn((n, H), seed, scale, dtype).requires_grad_()
    W = _randn((V, H), seed + 1, 1.0, dtype).requires_grad_()
    t = _randn((n, V), seed + 2, scale)
    if masked and kind != "rkl":  # teacher -inf entries: KL(T‖S) and JSD stay finite
        t[..., 1::2] = -math.inf
    kw = dict(beta=0.5, entry_clip=clip, chunk_size=2)
    if fused:
        loss, value = chunked_divergence_loss(h, W, t.to(dtype), kind, torch.ones(n), **kw)
    else:
        value = chunked_divergence(h, W, t.to(dtype), kind, **kw)
        loss = value.sum()
    assert torch.isfinite(value).all()
    gh, gw = torch.autograd.grad(loss, (h, W))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert gh.dtype == dtype and gw.dtype == dtype


@pytest.mark.parametrize("kind, beta, clip", CASES)
@pytest.mark.parametrize("support", [None, "teacher_topk"])
def test_nan_teacher_logit_at_masked_token_reaches_no_gradient(kind, beta, clip, support):
    h, W, b, t, _ = _inputs(seed=70)
    kw = dict(kind=kind, beta=beta, entry_clip=clip, support=support, k=4 if support else None, chunk_size=3)
    weights = torch.full((N,), 1.0 / (N - 1), dtype=torch.float64)
    weights[5] = 0.0  # token 5 is masked
    bad = t.clone()
    bad[5, 2] = math.nan

    def fused(teacher):
        loss, _ = chunked_divergence_loss(h, W, teacher, weights_N=weights, bias_V=b, **kw)
        return (loss, *torch.autograd.grad(loss, (h, W, b)))

    def recomputed(teacher):
        value = chunked_divergence(h, W, teacher, bias_V=b, **kw)
        loss = torch.where(weights > 0, value * weights, 0.0).sum()
        return (loss, *torch.autograd.grad(loss, (h, W, b)))

    for fn in (fused, recomputed):
        got, want = fn(bad), fn(t)
        assert all(torch.isfinite(x).all() for x in got)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind, beta, clip", CASES)
def test_nan_teacher_logit_at_kept_token_gives_nan_loss_and_finite_gradients(kind, beta, clip):
    h, W, b, t, _ = _inputs(seed=71)
    t[2, 0] = math.nan
    weights = torch.full((N,), 1.0 / N, dtype=torch.float64)
    loss, values = chunked_divergence_loss(h, W, t, kind, weights, bias_V=b, beta=beta, entry_clip=clip, chunk_size=3)
    assert torch.isnan(loss) and torch.isnan(values[2]) and torch.isfinite(values[[0, 1, 3, 4, 5, 6]]).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (h, W, b)))
    value = chunked_divergence(h, W, t, kind, bias_V=b, beta=beta, entry_clip=clip, chunk_size=3)
    torch.testing.assert_close(value, values, equal_nan=True)


def test_nan_float_arguments_are_refused():
    h, W, _, t, _ = _inputs(seed=72)
    with pytest.raises(ValueError, match="entry_clip must be a number or None, got nan"):
        chunked_divergence(h, W, t, "rkl", entry_clip=math.nan)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        chunked_divergence_loss(h, W, t, "rkl", torch.ones(N, dtype=torch.float64), temperature=math.nan)
