"""Per-position divergences against a naive loop-over-the-vocabulary reference."""

import ast
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.losses.divergence import divergence, entropy, log_softmax_t

KINDS = ["fkl", "rkl", "jsd"]
RENORM = ["both", "teacher", "none"]
TOL = {torch.float64: dict(rtol=1e-6, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def _randn(shape, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


# --- the naive reference: one position at a time, one vocabulary entry at a time -----


def ref_log_softmax(x):
    """Log-softmax of a 1-D tensor as a list of scalars (-inf logits give -inf)."""
    m = max(float(v) for v in x.detach())
    z = sum(torch.exp(v - m) for v in x)
    return [v - m - torch.log(z) for v in x]


def ref_logsumexp(values):
    m = max(float(v.detach()) for v in values)
    return m + torch.log(sum(torch.exp(v - m) for v in values))


def ref_entry(a, b, kind, beta):
    """ℓ for one entry from log-probs: a = log S(v), b = log T(v)."""

    def kl(x, y):  # e^x (x - y), with 0 log 0 = 0
        return torch.exp(x) * (x - y) if x > -math.inf else 0.0 * x.clamp_min(0)

    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return kl(b, a)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return kl(a, b)
    m = ref_logsumexp([b + math.log(beta), a + math.log(1 - beta)])
    return beta * kl(b, m) + (1 - beta) * kl(a, m)


def ref_position(s, t, kind, beta, support, k, renormalize, clip):
    S, T = ref_log_softmax(s), ref_log_softmax(t)
    V = len(S)
    if support is None:
        ids = list(range(V))
    else:
        side = t if support == "teacher_topk" else s
        ids = sorted(range(V), key=lambda v: -float(side[v].detach()))[:k]
    if support is not None and renormalize in ("both", "teacher"):
        zt = ref_logsumexp([T[v] for v in ids])
        T = [T[v] - zt for v in range(V)]
    if support is not None and renormalize == "both":
        zs = ref_logsumexp([S[v] for v in ids])
        S = [S[v] - zs for v in range(V)]
    total = 0.0
    for v in ids:
        ell = ref_entry(S[v], T[v], kind, beta)
        if clip is not None:
            ell = torch.clamp(ell, max=clip)
        total = total + ell
    return total


def ref_divergence(s_BTV, t_BTV, kind, beta=0.5, temperature=1.0, support=None, k=None,
                   renormalize="both", clip=None):  # fmt: skip
    s, t = s_BTV / temperature, t_BTV / temperature
    flat_s, flat_t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    rows = [
        ref_position(a, b, kind, beta, support, k, renormalize, clip)
        for a, b in zip(flat_s, flat_t)
    ]
    return torch.stack([torch.as_tensor(r, dtype=s.dtype) for r in rows]).reshape(s.shape[:-1])


def _values_and_grads(fn, s, t):
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    value = fn(s, t)
    w = _randn(value.shape, 99, dtype=value.dtype)
    gs, gt = torch.autograd.grad((value * w).sum(), (s, t))
    return value.detach(), gs, gt


def _assert_matches_reference(s, t, tol, **kw):
    ref_kw = {k: v for k, v in kw.items() if k != "entry_clip"}
    got = _values_and_grads(lambda a, b: divergence(a, b, **kw), s, t)
    ref = _values_and_grads(
        lambda a, b: ref_divergence(a, b, clip=kw.get("entry_clip"), **ref_kw),
        s.double(), t.double(),
    )  # fmt: skip
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, **tol)


# --- against the reference ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.2),
                                       ("jsd", 0.0), ("jsd", 1.0)])  # fmt: skip
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_vocab_matches_reference(dtype, kind, beta, temperature):
    s, t = _randn((2, 3, 9), 1, 2.0, dtype), _randn((2, 3, 9), 2, 2.0, dtype)
    _assert_matches_reference(s, t, TOL[dtype], kind=kind, beta=beta, temperature=temperature)


@pytest.mark.parametrize("support", ["teacher_topk", "student_topk"])
@pytest.mark.parametrize("renormalize", RENORM)
@pytest.mark.parametrize("kind", KINDS)
def test_topk_support_matches_reference(support, renormalize, kind):
    s, t = _randn((2, 2, 10), 3, 2.0), _randn((2, 2, 10), 4, 2.0)
    kw = dict(kind=kind, beta=0.3, support=support, k=4, renormalize=renormalize)
    _assert_matches_reference(s, t, TOL[torch.float64], temperature=0.8, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("support", [None, "teacher_topk"])
def test_entry_clip_matches_reference(kind, support):
    s, t = _randn((3, 8), 5, 2.0), _randn((3, 8), 6, 2.0)
    kw = dict(kind=kind, support=support, k=5 if support else None)
    _assert_matches_reference(s, t, TOL[torch.float64], entry_clip=0.05, **kw)


def test_leading_shapes():
    s, t = _randn((4, 7), 7), _randn((4, 7), 8)
    assert divergence(s, t, "rkl").shape == (4,)
    torch.testing.assert_close(divergence(s[None], t[None], "rkl")[0], divergence(s, t, "rkl"))


# --- identities -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("support", [None, "teacher_topk", "student_topk"])
@pytest.mark.parametrize("renormalize", RENORM)
def test_zero_when_equal(kind, support, renormalize):
    s = _randn((2, 3, 11), 9, 3.0)
    kw = dict(support=support, k=4 if support else None, renormalize=renormalize)
    value = divergence(s, s.clone(), kind, **kw)
    if renormalize == "both" or support is None:  # otherwise S is not normalized on S_t
        torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@given(seed=st.integers(0, 2**30), scale=st.sampled_from([0.1, 1.0, 10.0]))
@settings(max_examples=15, deadline=None)
def test_nonnegative(kind, seed, scale):
    s, t = _randn((3, 12), seed, scale), _randn((3, 12), seed + 1, scale)
    assert (divergence(s, t, kind, beta=0.37) >= 0).all()
    assert (divergence(s, t, kind, support="teacher_topk", k=5) >= 0).all()


def test_jsd_endpoints_are_the_kls_and_the_convention_is_trls():
    s, t = _randn((2, 5, 13), 10, 2.0), _randn((2, 5, 13), 11, 2.0)
    fkl, rkl = divergence(s, t, "fkl"), divergence(s, t, "rkl")
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.0), fkl, rtol=0, atol=0)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1.0), rkl, rtol=0, atol=0)
    # Direction: JSD_β ≈ β·FKL as β → 0 and ≈ (1−β)·RKL as β → 1.
    eps = 1e-6
    torch.testing.assert_close(divergence(s, t, "jsd", beta=eps) / eps, fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1 - eps) / eps, rkl, rtol=1e-4, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("support", ["teacher_topk", "student_topk"])
@pytest.mark.parametrize("renormalize", RENORM)
def test_topk_with_k_equal_v_is_full_vocab(kind, support, renormalize):
    s, t = _randn((2, 3, 9), 12, 2.0), _randn((2, 3, 9), 13, 2.0)
    full = _values_and_grads(lambda a, b: divergence(a, b, kind), s, t)
    topk = _values_and_grads(
        lambda a, b: divergence(a, b, kind, support=support, k=9, renormalize=renormalize), s, t
    )
    for a, b in zip(topk, full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_large_clip_is_no_clip():
    s, t = _randn((4, 9), 14, 2.0), _randn((4, 9), 15, 2.0)
    for kind in KINDS:
        torch.testing.assert_close(divergence(s, t, kind, entry_clip=1e9), divergence(s, t, kind))
        assert (divergence(s, t, kind, entry_clip=0.01) <= 9 * 0.01 + 1e-12).all()


def test_gradient_flows_to_both_and_teacher_can_be_detached():
    s = _randn((3, 6), 16).requires_grad_()
    t = _randn((3, 6), 17).requires_grad_()
    divergence(s, t, "rkl").sum().backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
    s.grad = None
    divergence(s, t.detach(), "rkl").sum().backward()
    assert s.grad.abs().sum() > 0


def test_upcasts_and_returns_float32_or_float64():
    s, t = _randn((2, 5), 18), _randn((2, 5), 19)
    assert divergence(s, t, "fkl").dtype == torch.float64
    assert divergence(s.bfloat16(), t.bfloat16(), "fkl").dtype == torch.float32
    assert divergence(s.half(), t.float(), "fkl").dtype == torch.float32


def test_errors():
    s, t = _randn((2, 5), 20), _randn((2, 5), 21)
    with pytest.raises(ValueError, match="shape"):
        divergence(s, t[:, :4], "rkl")
    with pytest.raises(ValueError, match="kind"):
        divergence(s, t, "kl")
    with pytest.raises(ValueError, match="beta"):
        divergence(s, t, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="k"):
        divergence(s, t, "rkl", support="teacher_topk")
    with pytest.raises(ValueError, match="renormalize"):
        divergence(s, t, "rkl", support="teacher_topk", k=2, renormalize="student")


# --- helpers ------------------------------------------------------------------------


def test_entropy_and_log_softmax_t():
    x = _randn((3, 7), 22, 2.0)
    x[0, :3] = -math.inf
    for row, h in zip(x, entropy(x, temperature=0.5)):
        logp = ref_log_softmax(row / 0.5)
        torch.testing.assert_close(h, -sum(torch.exp(a) * a for a in logp if a > -math.inf))
    torch.testing.assert_close(log_softmax_t(x, 0.5), torch.log_softmax(x / 0.5, -1))
    assert log_softmax_t(x.bfloat16()).dtype == torch.float32
    assert entropy(torch.full((2, 4), -math.inf)).eq(0).all()


# --- hostile inputs -------------------------------------------------------------------


def _hostile_pair(seed, V, scale, dtype, mask_mode):
    s, t = _randn((2, 3, V), seed, scale), _randn((2, 3, V), seed + 1, scale)
    g = torch.Generator().manual_seed(seed + 2)
    hole_s = torch.rand(s.shape, generator=g) < 0.4
    hole_s[..., 0] = False  # at least one finite logit per row
    hole_t = hole_s if mask_mode == "shared" else torch.rand(s.shape, generator=g) < 0.4
    if mask_mode != "none":
        s, t = s.masked_fill(hole_s, -math.inf), t.masked_fill(hole_t, -math.inf)
    return s.to(dtype), t.to(dtype)


def _assert_finite_with_grads(fn, s, t):
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    value = fn(s, t)
    assert torch.isfinite(value).all(), value
    gs, gt = torch.autograd.grad(value.sum(), (s, t))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    return value


@given(
    seed=st.integers(0, 2**30),
    V=st.integers(2, 9),
    scale=st.sampled_from([1.0, 1e2, 1e4]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    mask_mode=st.sampled_from(["none", "shared"]),
    kind=st.sampled_from(KINDS),
    support=st.sampled_from([None, "teacher_topk", "student_topk"]),
    renormalize=st.sampled_from(RENORM),
    clip=st.sampled_from([None, 0.05]),
)
@settings(max_examples=60, deadline=None)
def test_hostile_inputs_are_finite(seed, V, scale, dtype, mask_mode, kind, support, renormalize,
                                   clip):  # fmt: skip
    s, t = _hostile_pair(seed, V, scale, dtype, mask_mode)
    k = max(1, V // 2)
    kw = dict(beta=0.3, support=support, k=k, renormalize=renormalize, entry_clip=clip)
    if support == "student_topk" and renormalize != "both" and mask_mode != "none":
        kw["support"] = "teacher_topk"  # shared mask: S has -inf where T may have mass
    value = _assert_finite_with_grads(lambda a, b: divergence(a, b, kind, **kw), s, t)
    if dtype == torch.float64 and clip is None:
        ref = ref_divergence(s, t, kind, **{k_: v for k_, v in kw.items() if k_ != "entry_clip"})
        torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-8)


@given(seed=st.integers(0, 2**30), V=st.integers(2, 9), scale=st.sampled_from([1.0, 1e4]),
       beta=st.sampled_from([0.1, 0.5, 0.9]))  # fmt: skip
@settings(max_examples=20, deadline=None)
def test_jsd_finite_with_disjoint_masks(seed, V, scale, beta):
    s, t = _hostile_pair(seed, V, scale, torch.float32, "disjoint")
    t[..., 1 % V] = 0.0  # the teacher keeps some mass too
    _assert_finite_with_grads(lambda a, b: divergence(a, b, "jsd", beta=beta), s, t)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("support", [None, "teacher_topk"])
def test_row_without_distribution_is_zero(kind, support):
    s, t = _randn((3, 5), 23), _randn((3, 5), 24)
    s[1] = -math.inf
    t[2] = -math.inf
    value = _assert_finite_with_grads(
        lambda a, b: divergence(a, b, kind, support=support, k=2), s, t
    )
    assert value[1] == 0 and value[2] == 0 and value[0] > 0


def test_single_position_and_peaked_values():
    s = torch.tensor([[1e4, -1e4, 0.0]])
    t = torch.tensor([[-1e4, 1e4, 0.0]])
    for kind in KINDS:
        v = _assert_finite_with_grads(lambda a, b: divergence(a, b, kind), s, t)
        assert v.shape == (1,)
    # S puts all mass on token 0, T on token 1: RKL = log S(0) - log T(0) = 2e4.
    torch.testing.assert_close(divergence(s, t, "rkl"), torch.tensor([2e4]))
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.5), torch.tensor([math.log(2)]))


# --- pinned against TRL -------------------------------------------------------------


def trl_generalized_jsd_loss():
    """TRL's ``GKDTrainer.generalized_jsd_loss``: the installed source, run as is.

    Importing ``trl.experimental.gkd`` pulls in the whole trainer stack (~7 s), so the
    function's definition is parsed out of the installed ``gkd_trainer.py`` and executed
    with ``torch`` and ``F`` only; if the file is not where TRL 1.x keeps it, fall back
    to the real import.
    """
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed")
    path = Path(spec.origin).parent / "experimental" / "gkd" / "gkd_trainer.py"
    if not path.exists():
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        return pytest.importorskip("trl.experimental.gkd").GKDTrainer.generalized_jsd_loss
    tree = ast.parse(path.read_text())
    fn = next(
        n for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss"
    )  # fmt: skip
    fn.decorator_list = []
    namespace = {"torch": torch, "F": torch.nn.functional}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["generalized_jsd_loss"]


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_pinned_to_trl_generalized_jsd_loss(beta, temperature):
    s, t = _randn((2, 4, 17), 25, 2.0), _randn((2, 4, 17), 26, 2.0)
    trl = trl_generalized_jsd_loss()(s, t, beta=beta, temperature=temperature, reduction="none")
    ours = divergence(s, t, "jsd", beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, trl.sum(-1), rtol=1e-10, atol=1e-12)


# --- NaN: refused as an argument; selected away (never multiplied) at a masked position ---


def test_nan_and_inf_float_arguments_are_refused():
    s, t = _randn((2, 5), 40), _randn((2, 5), 41)
    with pytest.raises(ValueError, match="entry_clip must be a number or None, got nan"):
        divergence(s, t, "fkl", entry_clip=math.nan)
    with pytest.raises(ValueError, match="beta must be in"):
        divergence(s, t, "jsd", beta=math.nan)
    for bad in (math.nan, math.inf, 0.0):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            divergence(s, t, "rkl", temperature=bad)
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            entropy(s, temperature=bad)


def _head_case(seed, nan_at, **kw):
    """Student logits from a shared head (every row's gradient reaches all of W), a NaN
    teacher logit at ``nan_at``, the token mean over a mask that drops position (1, 2)."""
    from opd.losses import masked_token_mean

    h, W = _randn((2, 3, 4), seed), _randn((6, 4), seed + 1).requires_grad_()
    t = _randn((2, 3, 6), seed + 2, 2.0)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    clean = t.clone()
    t[nan_at][2] = math.nan
    loss = masked_token_mean(divergence(h @ W.T, t, **kw), mask)
    (g,) = torch.autograd.grad(loss, W)
    clean_loss = masked_token_mean(divergence(h @ W.T, clean, **kw), mask)
    return loss, g, clean_loss, torch.autograd.grad(clean_loss, W)[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("support", [None, "teacher_topk", "student_topk"])
def test_nan_teacher_logit_at_masked_position_reaches_no_gradient(kind, support):
    kw = dict(kind=kind, support=support, k=3 if support else None, entry_clip=0.5 if kind == "rkl" else None)
    loss, g, clean_loss, clean_g = _head_case(50, (1, 2), **kw)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(g, clean_g, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_teacher_logit_at_kept_position_gives_nan_not_zero(kind):
    s, t = _randn((2, 3, 6), 51).requires_grad_(), _randn((2, 3, 6), 52)
    t[0, 1, 4] = math.nan
    value = divergence(s, t, kind)
    assert torch.isnan(value[0, 1]) and torch.isfinite(value[[0, 1], [0, 0]]).all()
    (g,) = torch.autograd.grad(value, s, grad_outputs=torch.ones_like(value))  # the NaN row kept
    assert torch.isfinite(g).all() and (g[0, 1] == 0).all()
    loss, g_W, _, _ = _head_case(53, (0, 1), kind=kind)
    assert torch.isnan(loss) and torch.isfinite(g_W).all()  # loud loss, no NaN in any gradient


def test_entropy_and_logp_divergence_nan_rows():
    from opd.losses.divergence import divergence_from_logp

    x = _randn((2, 3, 5), 54).requires_grad_()
    x_nan = x.detach().clone()
    x_nan[1, 2, 0] = math.nan
    x_nan.requires_grad_()
    h = entropy(x_nan)
    assert torch.isnan(h[1, 2]) and torch.isfinite(h[[0, 1], [0, 0]]).all()
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    (g,) = torch.autograd.grad(torch.where(mask, h, 0.0).sum(), x_nan)
    (g_clean,) = torch.autograd.grad(torch.where(mask, entropy(x), 0.0).sum(), x)
    torch.testing.assert_close(g, g_clean, rtol=0, atol=0)
    d = divergence_from_logp(torch.log_softmax(x_nan, -1), torch.log_softmax(_randn((2, 3, 5), 55), -1), "fkl")
    assert torch.isnan(d[1, 2]) and torch.isfinite(d[0]).all()
