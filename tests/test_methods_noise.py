"""Local-noise fixes that change the supervised support (METHODS §6-7): topk_lsm and tip against
naive references (scope, eopd, the builders and two-step runs: ``test_methods_noise_weighting.py``)."""

import math

import pytest
import torch

from opd.losses import divergence, sparse_divergence
from opd.methods.base import StudentView
from opd.methods.tip import tip_loss, tip_signal
from opd.methods.topk_lsm import lsm_loss, lsm_signal, support_divergence
from opd.signals.teacher_logp import Head, tied_topk_mask
from opd.signals.tip import keep_top_fraction, minmax_normalize, tip_score
from opd.signals.topk_lsm import retained_mass, special_token_mask, teacher_support

from noise_fakes import D, TOL, distinct_ids, fake_exp, fake_scores, finite, gen, randn


# ------------------------------------------------------------------- naive references


def naive_support_rkl(s_logits, t_logp_V, support_V):
    """Σ_{v∈S} Ŝ(v) log(Ŝ(v)/T̂(v)) position by position, with explicit renormalization."""
    B, T, V = s_logits.shape
    out = torch.zeros(B, T, dtype=s_logits.dtype)
    for b in range(B):
        for t in range(T):
            sup = [(v, float(t_logp_V[b, t, v])) for v in range(V) if support_V[b, t, v]]
            if not sup:
                continue
            p = s_logits[b, t].softmax(-1)
            ps = torch.stack([p[v] for v, _ in sup])
            qs = torch.tensor([math.exp(lq) for _, lq in sup], dtype=s_logits.dtype)
            ps, qs = ps / ps.sum(), qs / qs.sum()
            out[b, t] = sum(ps[j] * (torch.log(ps[j]) - math.log(qs[j])) for j in range(len(sup)))
    return out


def naive_rkl(s_logits, t_logits):
    B, T, _ = s_logits.shape
    out = torch.zeros(B, T, dtype=s_logits.dtype)
    for b in range(B):
        for t in range(T):
            p, q = s_logits[b, t].softmax(-1), t_logits[b, t].softmax(-1)
            out[b, t] = sum(p[v] * (torch.log(p[v]) - torch.log(q[v])) for v in range(p.numel()))
    return out


# ------------------------------------------------------------------- topk_lsm


def test_teacher_support_with_and_without_sampled_token():
    logp = randn(2, 3, 6).log_softmax(-1)
    top3 = logp.topk(3, -1).indices
    support = teacher_support(logp, 3)
    assert support.sum(-1).eq(3).all() and support.gather(-1, top3).all()  # no ties: exactly the top 3
    tok = torch.tensor([[int(top3[0, 0, 1]), 5, 0], [1, 2, int(top3[1, 2, 0])]])
    with_tok = teacher_support(logp, 3, tok)
    for b in range(2):
        for t in range(3):
            want = set(top3[b, t].tolist()) | {int(tok[b, t])}
            assert set(with_tok[b, t].nonzero().squeeze(-1).tolist()) == want


def test_teacher_support_counts_ties_as_a_set():
    """The noise-free oracle: the intended id, 20 ids tied below it, 3 dead ids. Any K >= 2
    takes every tied id, whatever order topk would break the tie in; K = 1 the intended id."""
    logp = torch.full((1, 1, 24), -8.0067, dtype=D)
    logp[..., 5], logp[..., :3] = -0.0067, -38.0
    assert teacher_support(logp, 1).sum() == 1 and bool(teacher_support(logp, 1)[0, 0, 5])
    for k in (2, 8, 21):
        assert torch.equal(teacher_support(logp, k)[0, 0], torch.arange(24) >= 3)
    assert int(teacher_support(logp, 22).sum()) == 24  # the 22nd is a dead id, tied with the other two
    assert torch.equal(tied_topk_mask(logp, 8), teacher_support(logp, 8))


def test_special_token_mask_and_retained_mass():
    ids = torch.tensor([[0, 3, 5, 2], [1, 1, 4, 0]])
    got = special_token_mask(ids, (0, 1))
    assert got.tolist() == [[v in (0, 1) for v in row] for row in ids.tolist()]
    assert not special_token_mask(ids, ()).any()
    logp, keep = randn(2, 4, 3) - 2.0, torch.rand(2, 4, 3, generator=gen(1)) > 0.3
    want = torch.tensor([[sum(math.exp(float(logp[b, t, j])) for j in range(3) if keep[b, t, j]) for t in range(4)] for b in range(2)], dtype=D)
    torch.testing.assert_close(retained_mass(logp, keep), want, **TOL)


@pytest.mark.parametrize("with_dropped", [False, True])
def test_support_rkl_matches_naive_with_gradients(with_dropped):
    B, T, V, S = 2, 3, 9, 4
    logits = randn(B, T, V, scale=2.0).requires_grad_()
    ids = distinct_ids(B, T, S, V)
    support = torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, ids, True)
    t_logp = randn(B, T, V, seed=3).log_softmax(-1) - 0.5
    if with_dropped:
        support[0, 1, int(ids[0, 1, 2])] = support[1, 0, int(ids[1, 0, 0])] = False
        support[1, 2] = False  # nothing kept at a position
    t_logp = t_logp.masked_fill(~support, 123.0)  # garbage off the support must not matter
    got = support_divergence(logits, t_logp, support, "rkl")
    want = naive_support_rkl(logits, t_logp, support)
    torch.testing.assert_close(got, want, **TOL)
    w = randn(B, T, seed=7)
    (g_got,) = torch.autograd.grad((got * w).sum(), logits)
    (g_want,) = torch.autograd.grad((want * w).sum(), logits)
    torch.testing.assert_close(g_got, g_want, **TOL)


@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_support_divergence_agrees_with_the_loss_library(kind):
    B, T, V, K = 3, 4, 11, 5
    s, t = randn(B, T, V, scale=3.0), randn(B, T, V, seed=2, scale=3.0)
    t_logp_full = t.log_softmax(-1)
    top_logp, top_ids = t_logp_full.topk(K, dim=-1)
    got = support_divergence(s, t_logp_full, teacher_support(t_logp_full, K), kind)
    torch.testing.assert_close(got, sparse_divergence(s, top_ids, top_logp, kind, renormalize="both"), **TOL)
    torch.testing.assert_close(got, divergence(s, t, kind, support="teacher_topk", k=K, renormalize="both"), **TOL)
    # K = V: the full divergence
    full = support_divergence(s, t_logp_full, teacher_support(t_logp_full, V), kind)
    torch.testing.assert_close(full, divergence(s, t, kind), **TOL)
    if kind == "rkl":
        torch.testing.assert_close(full, naive_rkl(s, t), **TOL)


def test_support_rkl_extreme_inputs_stay_finite():
    B, T, V, S = 2, 3, 8, 4
    logits = randn(B, T, V) * 1e4
    logits[0, 0] = float("-inf")  # a position with no distribution
    logits = logits.requires_grad_()
    ids = distinct_ids(B, T, S, V)
    support = torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, ids, True)
    t_logp = randn(B, T, V, seed=1) * 1e3
    t_logp[1, 1] = float("-inf")
    t_logp[1, 1, int(ids[1, 1, 0])] = 0.0  # teacher mass on one id only
    support[1, 2] = False  # nothing kept at a position
    val = support_divergence(logits, t_logp.float(), support, "rkl")
    (g,) = torch.autograd.grad(val.sum(), logits)
    assert finite(val) and finite(g)
    assert float(val[1, 2].detach()) == 0.0 and float(val[0, 0].detach()) == 0.0


@pytest.mark.parametrize("add_sampled", [False, True])
def test_lsm_signal_masks_special_tokens_and_loss_matches_naive(add_sampled):
    exp = fake_exp()
    exp.extra["special_BT"] = special_token_mask(exp.batch.completion_ids_BT, (0, 3))
    scores = fake_scores(exp)
    sig = lsm_signal(exp, scores, k=3, add_sampled=add_sampled)
    comp = exp.batch.completion_mask_BT
    assert torch.equal(sig["mask_BT"], comp & ~torch.isin(exp.batch.completion_ids_BT, torch.tensor([0, 3])))
    ids, logp_K = sig["support_ids_BTK"], sig["support_logp_BTK"]
    valid = logp_K > float("-inf")
    full_logp = scores.logits_BTV.log_softmax(-1)
    support = torch.zeros(full_logp.shape, dtype=torch.bool).scatter(-1, ids, valid)
    torch.testing.assert_close(logp_K[valid], full_logp.gather(-1, ids)[valid], **TOL)  # the teacher's log-probs there
    want_support = torch.zeros_like(support).scatter(-1, full_logp.topk(3, -1).indices, True)
    if add_sampled:
        want_support = want_support.scatter(-1, exp.batch.completion_ids_BT[..., None], True)
    assert torch.equal(support, want_support)
    torch.testing.assert_close(sig["signal/retained_mass"], retained_mass(full_logp, support), **TOL)
    logits = randn(*scores.logits_BTV.shape, seed=9).requires_grad_()
    loss, metrics = lsm_loss(StudentView(logits, None), sig)
    want = naive_support_rkl(logits, full_logp, support)
    torch.testing.assert_close(loss, want, **TOL)
    assert set(metrics) == {"loss/rkl_topk"}
    # the lean view (hidden states and head, logits made per chunk and gathered): same values and gradients
    V = logits.shape[-1]
    head = torch.nn.Linear(V, V, bias=False).to(logits.dtype)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V, dtype=logits.dtype))
    hidden = logits.detach().clone().requires_grad_()
    lean, _ = lsm_loss(StudentView.from_hidden(hidden, head, exp.batch.completion_ids_BT, chunk_size=2), sig)
    torch.testing.assert_close(lean, want, **TOL)
    (g_lean,) = torch.autograd.grad((lean * comp).sum(), hidden)
    (g_want,) = torch.autograd.grad((want * comp).sum(), logits)
    torch.testing.assert_close(g_lean, g_want, **TOL)


# ------------------------------------------------------------------- tip


def test_minmax_normalize_matches_naive_and_handles_degenerate_inputs():
    v, m = randn(3, 5), torch.rand(3, 5, generator=gen(2)) > 0.3
    kept = [float(v[b, t]) for b in range(3) for t in range(5) if m[b, t]]
    lo, hi = min(kept), max(kept)
    want = torch.tensor([[(float(v[b, t]) - lo) / (hi - lo) if m[b, t] else 0.0 for t in range(5)] for b in range(3)], dtype=D)
    torch.testing.assert_close(minmax_normalize(v, m), want, **TOL)
    assert not minmax_normalize(torch.full((2, 3), 4.0), torch.ones(2, 3, dtype=torch.bool)).any()
    assert not minmax_normalize(v, torch.zeros_like(m)).any()
    w = v.clone()
    w[0, 0], w[1, 1], w[2, 2] = float("inf"), float("-inf"), float("nan")
    out = minmax_normalize(w, torch.ones_like(m))
    assert finite(out) and float(out[0, 0]) == 1.0 and float(out[1, 1]) == 0.0


def test_tip_score_and_top_fraction_match_naive():
    h, d, m = randn(4, 6).abs(), randn(4, 6, seed=1).abs(), torch.rand(4, 6, generator=gen(3)) > 0.25
    hn, dn = minmax_normalize(h, m), minmax_normalize(d, m)
    s = tip_score(h, d, m)
    for b in range(4):
        for t in range(6):
            x, y = float(hn[b, t]), float(dn[b, t])
            assert abs(float(s[b, t]) - (x + y - x * y)) < 1e-12
    for rho in (0.1, 0.3, 0.5, 1.0):
        keep = keep_top_fraction(s, m, rho)
        cells = sorted(((float(s[b, t]), -(b * 6 + t)) for b in range(4) for t in range(6) if m[b, t]), reverse=True)
        n = math.ceil(round(rho * len(cells), 9))
        want = torch.zeros(24, dtype=torch.bool)
        want[[-c[1] for c in cells[:n]]] = True
        assert torch.equal(keep, want.view(4, 6)), rho
        assert not (keep & ~m).any()


def test_top_fraction_breaks_ties_by_position():
    keep = keep_top_fraction(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.5)
    assert keep.tolist() == [[True, True, True], [False, False, False]]
    assert not keep_top_fraction(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), 0.5).any()
    with pytest.raises(ValueError):
        keep_top_fraction(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.0)


def _frozen_student(exp, s_logits):
    """TIP's frozen student as hidden states and head whose logits are ``s_logits`` exactly
    (the identity head: H = V)."""
    V = s_logits.shape[-1]
    exp.extra["student_hidden_BTH"] = s_logits
    exp.extra["student_head"] = Head(torch.eye(V, dtype=s_logits.dtype), None)


def test_tip_signal_and_loss_match_naive():
    exp = fake_exp()
    scores = fake_scores(exp)
    s_logits = randn(*scores.logits_BTV.shape, seed=11, scale=2.0)
    _frozen_student(exp, s_logits)
    sig = tip_signal(exp, scores, rho=0.5)
    comp = exp.batch.completion_mask_BT
    h = -(s_logits.softmax(-1) * s_logits.log_softmax(-1)).sum(-1)
    d = naive_rkl(s_logits, scores.logits_BTV)
    assert torch.equal(sig["mask_BT"], keep_top_fraction(tip_score(h, d, comp), comp, 0.5))
    assert int(sig["mask_BT"].sum()) == math.ceil(int(comp.sum()) / 2)
    logits = s_logits.clone().requires_grad_()
    loss, _ = tip_loss(StudentView(logits, None), sig)
    want = naive_rkl(logits, scores.logits_BTV)
    torch.testing.assert_close(loss, want, **TOL)
    keep = sig["mask_BT"]
    (g_got,) = torch.autograd.grad(loss[keep].sum() / keep.sum(), logits)
    (g_want,) = torch.autograd.grad(want[keep].sum() / keep.sum(), logits)
    torch.testing.assert_close(g_got, g_want, **TOL)


def test_tip_extreme_inputs_stay_finite():
    exp = fake_exp()
    scores = fake_scores(exp, scale=1e4)
    s_logits = randn(*scores.logits_BTV.shape, seed=4) * 1e4
    s_logits[0, 0, :3] = -1e30  # a hidden state of -inf would give NaN through the identity head
    _frozen_student(exp, s_logits)
    sig = tip_signal(exp, scores, rho=0.3)
    loss, _ = tip_loss(StudentView(s_logits.clone().requires_grad_(), None), sig)
    assert finite(sig["signal/tip_score"], loss) and sig["mask_BT"].any()
