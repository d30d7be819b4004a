"""Local-noise fixes (METHODS §6-9): topk_lsm, tip, scope, eopd against naive references."""

import math

import pytest
import torch

from opd.signals.teacher_logp import Head
from transformers import AutoModelForCausalLM

from opd.batch import make_batch
from opd.methods import build_method
from opd.methods.base import Experience, StudentView
from opd.methods.eopd import eopd_loss, eopd_signal
from opd.methods.scope import scope_loss, scope_signal
from opd.methods.tip import tip_loss, tip_signal
from opd.methods.topk_lsm import lsm_loss, lsm_signal, support_divergence
from opd.run.metrics_log import read_metrics
from opd.models.base import Scores
from opd.losses import divergence, sparse_divergence
from opd.run.runner import train
from opd.signals.eopd import eopd_combine, uncertain_mask
from opd.signals.scope import group_softmax_weights, scope_advantages, scope_weights
from opd.signals.tip import keep_top_fraction, minmax_normalize, tip_score
from opd.signals.topk_lsm import retained_mass, special_token_mask, teacher_support
from opd.signals.teacher_logp import tied_topk_mask

D = torch.float64
TOL = dict(atol=1e-6, rtol=1e-6)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=gen(seed), dtype=D) * scale


def distinct_ids(B, T, K, V, seed=0):
    return torch.stack([torch.randperm(V, generator=gen(seed + i))[:K] for i in range(B * T)]).view(B, T, K)


def finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def fake_exp(B=4, T=5, V=7, seed=0, group_size=2, rewards=None):
    """A batch of B rows with ragged completions, sampler log-probs and verifier outcomes."""
    lengths = [T - (b % 3) for b in range(B)]
    ids = torch.randint(0, V, (B, T), generator=gen(seed))
    completions = [ids[b, : lengths[b]].tolist() for b in range(B)]
    batch = make_batch([[1, 2]] * B, completions, pad_id=0, width=T)
    mask = batch.completion_mask_BT
    sampler = torch.where(mask, -torch.rand(B, T, generator=gen(seed + 1), dtype=D) * 3, 0.0)
    rewards = torch.tensor(rewards if rewards is not None else [float(b % 3 == 0) for b in range(B)])
    group = torch.arange(B // group_size).repeat_interleave(group_size)
    return Experience(batch, [None] * B, group, sampler_logp_BT=sampler, rewards_B=rewards)


def fake_scores(exp, V=7, K=3, seed=5, scale=2.0):
    B, T = exp.batch.completion_mask_BT.shape
    logits = randn(B, T, V, seed=seed, scale=scale)
    logp = logits.log_softmax(-1)
    top_logp, top_ids = logp.topk(K, dim=-1)
    tok = logp.gather(-1, exp.batch.completion_ids_BT[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return Scores(tok, ent, top_ids, top_logp, logits)


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


def naive_fkl_topk(s_logits, t_logp_V, k):
    """Forward KL on the teacher's top-k, ties included, both sides renormalized there."""
    B, T, V = s_logits.shape
    out = torch.zeros(B, T, dtype=s_logits.dtype)
    for b in range(B):
        for t in range(T):
            kth = sorted(t_logp_V[b, t].tolist(), reverse=True)[k - 1]
            ids = [v for v in range(V) if float(t_logp_V[b, t, v]) >= kth - 1e-6]
            p = s_logits[b, t].softmax(-1)[ids]
            p = p / p.sum()
            q = t_logp_V[b, t, ids].exp()
            q = q / q.sum()
            out[b, t] = sum(q[j] * (torch.log(q[j]) - torch.log(p[j])) for j in range(len(ids)))
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


# ------------------------------------------------------------------- scope


def test_group_softmax_weights_match_naive():
    x, member = randn(10, scale=3.0), torch.rand(10, generator=gen(1)) > 0.4
    group = torch.tensor([7, 7, 7, 2, 2, 2, 2, 9, 9, 5])
    got = group_softmax_weights(x, member, group)
    for b in range(10):
        peers = [j for j in range(10) if group[j] == group[b] and member[j]]
        if not member[b]:
            assert float(got[b]) == 0.0
            continue
        z = sum(math.exp(float(x[j])) for j in peers)
        assert abs(float(got[b]) - math.exp(float(x[b])) / z) < 1e-9
    for g in group.unique():
        sel = (group == g) & member
        if sel.any():
            assert abs(float(got[sel].sum()) - 1.0) < 1e-12


def test_group_softmax_weights_extreme_inputs():
    x = torch.tensor([float("inf"), 0.0, float("-inf"), float("nan"), -1e308, -1e308])
    got = group_softmax_weights(x, torch.ones(6, dtype=torch.bool), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert finite(got)
    assert got.tolist()[:2] == [1.0, 0.0] and abs(float(got[4]) - 0.5) < 1e-12


def naive_scope_weights(s_logp, t_logp, mask, correct, group, tau):
    """Each branch of a group sums to 1 (METHODS §8), times the group's row count G."""
    B = s_logp.shape[0]
    out = [0.0] * B
    for b in range(B):
        n = int(mask[b].sum())
        if n == 0:
            continue
        rows = sum(int(group[j] == group[b]) for j in range(B))
        peers = [j for j in range(B) if group[j] == group[b] and bool(correct[j]) == bool(correct[b]) and mask[j].any()]

        def raw(j):
            mean_s = float(s_logp[j][mask[j]].mean())
            mean_t = float(t_logp[j][mask[j]].mean())
            return math.exp(-mean_s) ** (1 / tau) if correct[j] else math.exp(-mean_t) ** (-1 / tau)

        out[b] = rows * raw(b) / sum(raw(j) for j in peers)
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_scope_weights_match_naive(tau):
    exp = fake_exp(B=8, group_size=4, rewards=[1, 0, 1, 0, 0, 0, 0, 1])
    scores = fake_scores(exp)
    mask = exp.batch.completion_mask_BT.clone()
    mask[3] = False  # a row without tokens is in no branch
    got = scope_weights(exp.sampler_logp_BT, scores.token_logp_BT, mask, exp.rewards_B > 0.5, exp.group_B, tau)
    want = naive_scope_weights(exp.sampler_logp_BT, scores.token_logp_BT, mask, exp.rewards_B > 0.5, exp.group_B, tau)
    torch.testing.assert_close(got, want, **TOL)


def test_scope_uniform_weights_reduce_to_plain_losses():
    # uniform weights: a group whose rows share one branch weighs 1 per row (plain token-mean
    # MLE/OPD); a group with both branches gives each branch the group's G rows of weight
    for rewards, group_size, want in (([1, 1, 0, 0], 2, [1.0] * 4), ([1, 0, 1, 0], 4, [2.0] * 4)):
        exp = fake_exp(B=4, T=3, group_size=group_size, rewards=rewards)
        mask = torch.ones(4, 3, dtype=torch.bool)
        flat = torch.full((4, 3), -0.7, dtype=D)  # equal perplexities on both sides
        w = scope_weights(flat, flat, mask, exp.rewards_B > 0.5, exp.group_B, 1.0)
        torch.testing.assert_close(w, torch.tensor(want, dtype=D), **TOL)
        w_huge_tau = scope_weights(exp.sampler_logp_BT, randn(4, 3), mask, exp.rewards_B > 0.5, exp.group_B, 1e12)
        torch.testing.assert_close(w_huge_tau, torch.tensor(want, dtype=D), **TOL)


def test_scope_branches_weigh_the_same_whatever_their_sizes():
    """1 correct and 7 wrong rollouts, uniform weights: each branch sums to 1 (METHODS §8),
    times G = 8, so the correct row weighs 8 and each wrong row 8/7 (not 1 each, which
    would give the wrong branch 7x the weight of the correct one)."""
    exp = fake_exp(B=8, T=3, group_size=8, rewards=[1, 0, 0, 0, 0, 0, 0, 0])
    flat = torch.full((8, 3), -0.7, dtype=D)
    w = scope_weights(flat, flat, torch.ones(8, 3, dtype=torch.bool), exp.rewards_B > 0.5, exp.group_B, 1.0)
    torch.testing.assert_close(w, torch.tensor([8.0] + [8 / 7] * 7, dtype=D), **TOL)
    assert abs(float(w[:1].sum()) - float(w[1:].sum())) < 1e-12


def test_scope_loss_matches_naive_with_gradients():
    exp = fake_exp(B=6, group_size=3, rewards=[1, 0, 0, 1, 1, 0])
    scores = fake_scores(exp)
    sig = scope_signal(exp, scores, tau=1.0)
    mask = sig["mask_BT"]
    logp = (exp.sampler_logp_BT + randn(6, 5, seed=8) * 0.1).requires_grad_()
    loss, metrics = scope_loss(StudentView(None, logp), sig)
    w = sig["weight_B"].double()
    B, T = mask.shape
    want = torch.zeros(B, T, dtype=D)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            rho = torch.exp(logp[b, t] - exp.sampler_logp_BT[b, t])
            delta = float(logp[b, t].detach()) - float(scores.token_logp_BT[b, t])
            want[b, t] = -w[b] * rho if exp.rewards_B[b] > 0.5 else w[b] * rho * delta
    torch.testing.assert_close(torch.where(mask, loss, 0.0), want, **TOL)
    torch.testing.assert_close(metrics["loss/mle"] + metrics["loss/opd"], loss.detach(), **TOL)
    (g_got,) = torch.autograd.grad(torch.where(mask, loss, 0.0).sum(), logp)
    (g_want,) = torch.autograd.grad(want.sum(), logp)
    torch.testing.assert_close(g_got, g_want, **TOL)


def test_scope_extreme_inputs_stay_finite():
    for rewards in ([1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]):
        exp = fake_exp(B=4, group_size=2, rewards=rewards)
        scores = fake_scores(exp)
        scores.token_logp_BT[0, :2] = float("-inf")
        exp.sampler_logp_BT[1, 0] = -1e4
        sig = scope_signal(exp, scores, tau=0.01)
        loss, _ = scope_loss(StudentView(None, exp.sampler_logp_BT.clone().requires_grad_()), sig)
        assert finite(sig["weight_B"], loss)
    adv = scope_advantages(torch.ones(2), torch.tensor([False, True]), torch.zeros(2, 2), torch.full((2, 2), float("-inf")), torch.zeros(2, 2, dtype=torch.bool))
    assert not adv.any()


# ------------------------------------------------------------------- eopd


@pytest.mark.parametrize("mode", ["add", "switch"])
def test_eopd_combine_matches_naive(mode):
    opd, fkl = randn(3, 4), randn(3, 4, seed=1).abs()
    u = torch.rand(3, 4, generator=gen(2)) > 0.5
    got = eopd_combine(opd, fkl, u, lam=0.7, mode=mode)
    for b in range(3):
        for t in range(4):
            base = float(opd[b, t]) * (1.0 if mode == "add" or not u[b, t] else 0.0)
            assert abs(float(got[b, t]) - (base + (0.7 * float(fkl[b, t]) if u[b, t] else 0.0))) < 1e-12
    assert torch.equal(uncertain_mask(torch.tensor([0.5, 0.8, 0.81]), 0.8), torch.tensor([False, False, True]))
    with pytest.raises(ValueError):
        eopd_combine(opd, fkl, u, lam=1.0, mode="mix")


@pytest.mark.parametrize("mode", ["add", "switch"])
def test_eopd_loss_matches_naive_with_gradients(mode):
    exp = fake_exp()
    scores = fake_scores(exp, K=4)
    tau = float(scores.entropy_BT.median())
    sig = eopd_signal(exp, scores, k=4, tau=tau)
    mask = exp.batch.completion_mask_BT
    u = (scores.entropy_BT > tau) & mask
    assert torch.equal(sig["signal/uncertain_frac"], u.float())
    logits = randn(*scores.logits_BTV.shape, seed=12).requires_grad_()
    logp = logits.log_softmax(-1).gather(-1, exp.batch.completion_ids_BT[..., None]).squeeze(-1)
    loss, metrics = eopd_loss(StudentView(logits, logp), sig, lam=0.5, mode=mode, opd_loss="is", clip_eps=0.2)
    adv = -(exp.sampler_logp_BT - scores.token_logp_BT)
    opd = -torch.exp(logp - exp.sampler_logp_BT) * adv
    fkl = naive_fkl_topk(logits, scores.logits_BTV.log_softmax(-1), 4)
    want = torch.where(u, 0.5 * fkl + (opd if mode == "add" else 0.0), opd)
    torch.testing.assert_close(torch.where(mask, loss, 0.0), torch.where(mask, want, 0.0), **TOL)
    torch.testing.assert_close(metrics["loss/fkl_topk"], fkl, **TOL)
    (g_got,) = torch.autograd.grad(torch.where(mask, loss, 0.0).sum(), logits, retain_graph=True)
    (g_want,) = torch.autograd.grad(torch.where(mask, want, 0.0).sum(), logits)
    torch.testing.assert_close(g_got, g_want, **TOL)


def test_eopd_extreme_inputs_stay_finite():
    exp = fake_exp()
    scores = fake_scores(exp, K=4, scale=1e4)
    scores.logits_BTV[0, 0, 1:] = float("-inf")
    sig = eopd_signal(exp, scores, k=4, tau=0.0)
    logits = (randn(*scores.logits_BTV.shape, seed=3) * 1e4).requires_grad_()
    logp = logits.log_softmax(-1).gather(-1, exp.batch.completion_ids_BT[..., None]).squeeze(-1)
    loss, _ = eopd_loss(StudentView(logits, logp), sig, lam=1.0, mode="add", opd_loss="ppo", clip_eps=0.2)
    (g,) = torch.autograd.grad(torch.where(sig["mask_BT"], loss, 0.0).sum(), logits)
    assert finite(loss, g)


# ------------------------------------------------------------------- builders and smoke runs


def test_builders_refuse_bad_knobs():
    for name, bad in [("topk_lsm", {"lsm_k": 0}), ("tip", {"tip_rho": 0.0}), ("tip", {"tip_rho": 1.5}),
                      ("scope", {"scope_tau": 0.0}), ("eopd", {"eopd_k": 0}), ("eopd", {"eopd_mode": "mix"})]:
        with pytest.raises(ValueError):
            build_method(name, bad)
    assert build_method("topk_lsm", {"lsm_k": 5}).teacher_request.topk == 5
    assert build_method("tip", {}).needs == ("teacher", "full_teacher")
    scope = build_method("scope", {})
    assert scope.min_group_size == 2 and set(scope.needs) == {"teacher", "verifier"}
    assert build_method("eopd", {}).teacher_request.full  # the top-K with ties needs every id's log-prob


@pytest.mark.parametrize(
    "method,knobs",
    [("topk_lsm", {"lsm_add_sampled": True, "top_p": 0.9}), ("tip", {}), ("scope", {}), ("eopd", {"eopd_mode": "switch", "eopd_tau": 0.0})],
)
def test_method_trains_two_steps(method, knobs, tiny_cfg):
    cfg = tiny_cfg(method=method, eval_size=2, eval_k=1, **knobs)
    train(cfg)
    rows = read_metrics(cfg.run_dir)
    losses = {k: v for r in rows[1:] for k, v in r.items() if k.startswith("loss/")}
    assert losses and all(v is not None and math.isfinite(v) for v in losses.values())
    signal_keys = {"topk_lsm": "signal/retained_mass", "tip": "signal/tip_score", "scope": "signal/row_weight", "eopd": "signal/uncertain_frac"}
    assert all(math.isfinite(r[signal_keys[method]]) for r in rows[1:])
    if method == "tip":
        assert all(abs(r["signal/kept_frac"] - 0.5) < 0.1 for r in rows[1:])
    if method == "eopd":  # tau = 0: every position is "uncertain", switch trains forward KL only
        assert all(r["signal/uncertain_frac"] > 0.9 for r in rows[1:])
    before = AutoModelForCausalLM.from_pretrained(cfg.student).state_dict()
    after = AutoModelForCausalLM.from_pretrained(f"{cfg.run_dir}/checkpoints/step_000002").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
