"""Sparse (top-K) teacher: equal to the dense top-K form; the tail bucket against a reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.losses.divergence import divergence
from opd.losses.sparse import log1mexp, sparse_divergence

KINDS = ["fkl", "rkl", "jsd"]
RENORM = ["both", "teacher", "none"]


def _randn(shape, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _teacher_topk(t_BTV, k, temperature=1.0):
    """What a server sends: top-K ids and the full-vocabulary log-probs at those ids."""
    ids = t_BTV.topk(k, dim=-1).indices
    return ids, torch.log_softmax(t_BTV / temperature, -1).gather(-1, ids)


def _grad(fn, s):
    s = s.clone().requires_grad_()
    value = fn(s)
    w = _randn(value.shape, 77, dtype=value.dtype)
    (g,) = torch.autograd.grad((value * w).sum(), s)
    return value.detach(), g


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("renormalize", RENORM)
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_dense_teacher_topk(kind, renormalize, clip, dtype):
    s, t = _randn((2, 3, 12), 1, 2.0, dtype), _randn((2, 3, 12), 2, 2.0, dtype)
    ids, logp = _teacher_topk(t, 5, temperature=0.7)
    kw = dict(beta=0.3, temperature=0.7, renormalize=renormalize, entry_clip=clip)
    sparse = _grad(lambda a: sparse_divergence(a, ids, logp, kind, **kw), s)
    dense = _grad(lambda a: divergence(a, t, kind, support="teacher_topk", k=5, **kw), s)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, **tol)


def ref_tail_divergence(s_row, t_row, ids, kind, beta):
    """K+1 outcomes built from the full distributions, summed entry by entry (float64)."""
    S, T = torch.softmax(s_row, -1), torch.softmax(t_row, -1)
    inside = set(int(i) for i in ids)
    p = [S[int(i)] for i in ids] + [sum(S[v] for v in range(len(S)) if v not in inside)]
    q = [T[int(i)] for i in ids] + [sum(T[v] for v in range(len(T)) if v not in inside)]
    total = 0.0
    for a, b in zip(p, q):
        if kind == "fkl":
            total += b * math.log(b / a) if b > 0 else 0.0
        elif kind == "rkl":
            total += a * math.log(a / b) if a > 0 else 0.0
        else:
            m = beta * b + (1 - beta) * a
            total += beta * b * math.log(b / m) if b > 0 else 0.0
            total += (1 - beta) * a * math.log(a / m) if a > 0 else 0.0
    return float(total)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("renormalize", RENORM)
def test_tail_bucket_matches_reference(kind, renormalize):
    s, t = _randn((4, 10), 3, 2.0), _randn((4, 10), 4, 2.0)
    ids, logp = _teacher_topk(t, 3)
    got = sparse_divergence(s, ids, logp, kind, beta=0.4, tail_bucket=True, renormalize=renormalize)
    ref = [ref_tail_divergence(a, b, i, kind, 0.4) for a, b, i in zip(s, t, ids)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_tail_bucket_gradient_matches_dense_form(kind):
    """Tail bucket == full divergence of the K+1-outcome logits (the bucket's logit is
    the logsumexp of the others): values and student gradients."""
    s, t = _randn((3, 9), 5, 2.0), _randn((3, 9), 6, 2.0)
    ids, logp = _teacher_topk(t, 4)
    rest = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)

    def bucketed(x):
        tail = x.masked_fill(~rest, -math.inf).logsumexp(-1, keepdim=True)
        return torch.cat([x.gather(-1, ids), tail], -1)

    got = _grad(lambda a: sparse_divergence(a, ids, logp, kind, tail_bucket=True), s)
    ref = _grad(lambda a: divergence(bucketed(a), bucketed(t), kind), s)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_tail_bucket_with_k_equal_v_is_full_vocab(kind):
    s, t = _randn((2, 3, 7), 7, 2.0), _randn((2, 3, 7), 8, 2.0)
    ids, logp = _teacher_topk(t, 7)
    got = _grad(lambda a: sparse_divergence(a, ids, logp, kind, tail_bucket=True), s)
    ref = _grad(lambda a: divergence(a, t, kind), s)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert torch.isfinite(a).all()


def test_tail_is_accurate_for_a_peaked_student_in_float32():
    """Top-K holds all but ~1e-12 of the student's mass: the tail is not 1 − Σ (which
    would cancel to 0 in float32) but an exact logsumexp of the other logits."""
    s = torch.zeros(1, 50)
    s[0, :3] = 30.0
    t = _randn((1, 50), 9)
    t[0, :3] += 5.0
    ids, logp = _teacher_topk(t, 3)
    got = sparse_divergence(s, ids, logp.float(), "fkl", tail_bucket=True)
    ref = ref_tail_divergence(s[0].double(), t[0], ids[0], "fkl", 0.5)
    torch.testing.assert_close(got, torch.tensor([ref], dtype=torch.float32), rtol=1e-5, atol=0)


def test_confident_teacher_keeps_rkl_finite_and_small():
    """Teacher top-K mass 1 − 1e-9 in float32 log-probs: the tail is unresolvable and is
    taken as K·eps, so a student with 1% outside pays a moderate, not a huge, price."""
    s = torch.zeros(1, 20)
    s[0, :2] = 6.0  # student: ~2% of its mass outside the two ids
    logp = torch.tensor([[math.log(0.5 - 5e-10), math.log(0.5 - 5e-10)]], dtype=torch.float32)
    ids = torch.tensor([[0, 1]])
    value = sparse_divergence(s, ids, logp, "rkl", tail_bucket=True)
    s_tail = 18 / (18 + 2 * math.exp(6.0))
    teacher_tail = 2 * 2**-23  # K·eps(float32)
    expected = (1 - s_tail) * math.log(1 - s_tail) + s_tail * math.log(s_tail / teacher_tail)
    torch.testing.assert_close(value, torch.tensor([expected]), rtol=1e-3, atol=0)


def test_log1mexp():
    x = torch.tensor([-1e-20, -1e-5, -0.5, -0.7, -2.0, -50.0, 0.0, 1e-3], dtype=torch.float64)
    x.requires_grad_()
    y = log1mexp(x)
    ref = [
        math.log(-math.expm1(v)) if v > -0.69 else math.log1p(-math.exp(v)) for v in x[:6].tolist()
    ]
    torch.testing.assert_close(y[:6], torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
    assert (y[6:] == torch.finfo(torch.float64).min).all()
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all() and (g[6:] == 0).all()


@given(
    seed=st.integers(0, 2**30),
    V=st.integers(2, 9),
    scale=st.sampled_from([1.0, 1e2, 1e4]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    masked=st.booleans(),
    kind=st.sampled_from(KINDS),
    renormalize=st.sampled_from(RENORM),
    tail=st.booleans(),
    clip=st.sampled_from([None, 0.05]),
)
@settings(max_examples=50, deadline=None)
def test_hostile_inputs_are_finite(seed, V, scale, dtype, masked, kind, renormalize, tail, clip):
    s, t = _randn((2, 2, V), seed, scale), _randn((2, 2, V), seed + 1, scale)
    if masked:  # shared -inf entries (a padded vocabulary), one finite logit kept per row
        hole = torch.rand(s.shape, generator=torch.Generator().manual_seed(seed)) < 0.4
        hole[..., 0] = False
        s, t = s.masked_fill(hole, -math.inf), t.masked_fill(hole, -math.inf)
    k = max(1, V // 2)
    ids, logp = _teacher_topk(t, k)
    s = s.to(dtype).requires_grad_()
    logp = logp.to(dtype).requires_grad_()
    kw = dict(beta=0.3, renormalize=renormalize, tail_bucket=tail, entry_clip=clip)
    value = sparse_divergence(s, ids, logp, kind, **kw)
    assert torch.isfinite(value).all()
    gs, gt = torch.autograd.grad(value.sum(), (s, logp))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_teacher_without_mass_gives_zero():
    s = _randn((3, 6), 10)
    ids = torch.tensor([[0, 1]] * 3)
    logp = torch.tensor([[-0.1, -3.0], [-math.inf, -math.inf], [-1.0, -2.0]])
    value = sparse_divergence(s, ids, logp, "rkl", tail_bucket=False)
    assert value[1] == 0 and torch.isfinite(value).all() and value[0] > 0


def test_errors():
    s = _randn((2, 6), 11)
    ids, logp = _teacher_topk(_randn((2, 6), 12), 3)
    with pytest.raises(ValueError, match="shapes"):
        sparse_divergence(s, ids[:, :2], logp, "rkl")
    with pytest.raises(TypeError, match="int64"):
        sparse_divergence(s, ids.int(), logp, "rkl")
    with pytest.raises(ValueError, match="kind"):
        sparse_divergence(s, ids, logp, "xkl")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail_bucket", [False, True])
def test_nan_teacher_logp_at_masked_position_reaches_no_gradient(kind, tail_bucket):
    from opd.losses import masked_token_mean

    h, W = _randn((2, 3, 4), 60), _randn((8, 4), 61).requires_grad_()
    ids, lp = _teacher_topk(_randn((2, 3, 8), 62, 2.0), 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False

    def loss_and_grad(lp):
        loss = masked_token_mean(sparse_divergence(h @ W.T, ids, lp, kind, tail_bucket=tail_bucket), mask)
        return loss, torch.autograd.grad(loss, W)[0]

    bad = lp.clone()
    bad[1, 2, 1] = math.nan
    loss, g = loss_and_grad(bad)
    clean_loss, clean_g = loss_and_grad(lp)
    assert torch.isfinite(g).all()
    torch.testing.assert_close((loss, g), (clean_loss, clean_g), rtol=0, atol=0)
    bad[0, 0, 0] = math.nan  # at a kept position: the loss is NaN, no gradient is
    loss, g = loss_and_grad(bad)
    assert torch.isnan(loss) and torch.isfinite(g).all()


def test_nan_entry_clip_is_refused():
    ids, lp = _teacher_topk(_randn((2, 6), 63), 2)
    with pytest.raises(ValueError, match="entry_clip must be a number or None, got nan"):
        sparse_divergence(_randn((2, 6), 64), ids, lp, "fkl", entry_clip=math.nan)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("renormalize, tail", [("both", False), ("teacher", False), ("none", False), ("both", True)])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_full_logits_values_and_gradients(kind, renormalize, tail, bias):
    """From hidden states and the LM head, chunk by chunk (3 positions of 7 per chunk):
    values and gradients of hidden, weight and bias equal the full-logits form (float64)."""
    from opd.losses.sparse import chunked_sparse_divergence

    N, H, V, K = 7, 5, 17, 4
    h = _randn((N, H), 3).requires_grad_()
    W = _randn((V, H), 4).requires_grad_()
    b = _randn((V,), 5).requires_grad_() if bias else None
    ids, logp = _teacher_topk(_randn((N, V), 6, 2.0), K, temperature=0.7)
    kw = dict(beta=0.3, temperature=0.7, renormalize=renormalize, tail_bucket=tail, entry_clip=0.05 if kind == "rkl" else None)
    inputs = (h, W) + ((b,) if bias else ())
    up = _randn((N,), 8)
    got = chunked_sparse_divergence(h, W, ids, logp, kind, bias_V=b, chunk_size=3, **kw)
    want = sparse_divergence(torch.nn.functional.linear(h, W, b), ids, logp, kind, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, c in zip(torch.autograd.grad((got * up).sum(), inputs), torch.autograd.grad((want * up).sum(), inputs)):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


def test_chunked_tail_when_the_ids_are_the_whole_vocabulary():
    """K = V: no mass outside, the tail bucket is exactly 0 on both sides (as the full form)."""
    from opd.losses.sparse import chunked_sparse_divergence

    h, W = _randn((3, 4), 1).requires_grad_(), _randn((6, 4), 2).requires_grad_()
    ids, logp = _teacher_topk(_randn((3, 6), 3), 6)
    got = chunked_sparse_divergence(h, W, ids, logp, "rkl", tail_bucket=True, chunk_size=2)
    want = sparse_divergence(h @ W.T, ids, logp, "rkl", tail_bucket=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, c in zip(torch.autograd.grad(got.sum(), (h, W)), torch.autograd.grad(want.sum(), (h, W))):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)
