"""Horizon methods (trunc, topd, popd, prune_opd, suffix_fade): the length budget, the
Prune-OPD and suffix-fade signals against naive loop references, hostile inputs, and
short training runs (including resume of the budget state)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.batch import make_batch
from opd.losses import masked_token_mean
from opd.methods import METHODS
from opd.methods.base import Experience, StudentView
from opd.methods.prune_opd import prune_signal
from opd.methods.suffix_fade import fade_signal
from opd.run.metrics_log import read_metrics
from opd.models.base import Scores
from opd.rollouts.budget import LengthBudget, adaptive_budget, fixed_budget, ramp_budget
from opd.run.runner import Run, train
from opd.signals.prune import drift_reliability_BT, next_budget, reliable_mask_BT, tied_topk_overlap_BT, topk_overlap_BT
from opd.signals.suffix_fade import (
    LOGP_FLOOR,
    candidate_logp_BTK,
    change_point_B,
    fade_mask_BT,
    segment_ids_BT,
    step_means_BS,
    teacher_margin_BT,
    window_boundaries_BT,
)

F64 = dict(rtol=1e-9, atol=1e-9)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _prefix_mask(B, T, seed, min_len=0):
    lengths = torch.randint(min_len, T + 1, (B,), generator=_gen(seed))
    return torch.arange(T)[None, :] < lengths[:, None]


def _distinct_ids(B, T, K, V, seed):
    """Per position, K distinct ids (as topk gives them)."""
    return torch.rand(B, T, V, generator=_gen(seed)).topk(K, dim=-1).indices


# --- the length budget ---------------------------------------------------------------


def naive_ramp(step, n0, n1, R, schedule):
    f = 1.0 if R <= 1 else min(1.0, step / (R - 1))
    raw = n0 + f * (n1 - n0) if schedule == "linear" else n0 * (n1 / n0) ** f
    return max(1, min(n1, round(raw)))


@pytest.mark.parametrize("schedule", ["linear", "geometric"])
@pytest.mark.parametrize("start_frac,max_tokens,ramp", [(0.1, 96, 40), (0.5, 7, 3), (0.01, 50, 1), (1.0, 10, 5)])
def test_ramp_schedule_matches_formula(schedule, start_frac, max_tokens, ramp):
    budget = ramp_budget(start_frac, max_tokens, ramp, schedule)
    n0 = max(1, round(start_frac * max_tokens))
    got = [budget(s) for s in range(ramp + 5)]
    assert got == [naive_ramp(s, n0, max_tokens, ramp, schedule) for s in range(ramp + 5)]
    assert got[0] == (n0 if ramp > 1 else max_tokens) and got[max(0, ramp - 1)] == max_tokens
    assert all(a <= b for a, b in zip(got, got[1:]))


def test_fixed_and_adaptive_budgets_clamp():
    assert fixed_budget(100, 40)(0) == 40 and fixed_budget(0, 40)(7) == 1 and fixed_budget(5, 40)(1000) == 5
    budget = adaptive_budget(30)
    assert budget(0) == 30
    budget.set_next(12)
    assert budget(1) == 12
    budget.set_next(1000)
    assert budget(2) == 30
    budget.set_next(0)
    assert budget(3) == 1
    with pytest.raises(ValueError, match="adaptive"):
        fixed_budget(5, 40).set_next(3)
    with pytest.raises(ValueError):
        LengthBudget(max_tokens=0, start_tokens=1)


@pytest.mark.parametrize("make", [lambda: ramp_budget(0.1, 96, 10, "geometric"), lambda: adaptive_budget(50)])
def test_budget_state_round_trips(make):
    a = make()
    if a.schedule == "adaptive":
        a.set_next(17)
    b = make()
    b.load_state_dict(a.state_dict())
    assert b == a and [b(s) for s in range(15)] == [a(s) for s in range(15)]
    with pytest.raises(ValueError, match="unknown keys"):
        b.load_state_dict({"bogus": 1})


# --- Prune-OPD signals ---------------------------------------------------------------


def naive_overlap(S, T):
    B, L, K = S.shape
    return [[len(set(S[b, t].tolist()) & set(T[b, t].tolist())) / K for t in range(L)] for b in range(B)]


@pytest.mark.parametrize("K,KT,V", [(1, 1, 3), (4, 4, 6), (8, 5, 30), (3, 3, 3)])
def test_topk_overlap_against_sets(K, KT, V):
    S, T = _distinct_ids(3, 9, K, V, 1), _distinct_ids(3, 9, KT, V, 2)
    got = topk_overlap_BT(S, T)
    assert torch.allclose(got, torch.tensor(naive_overlap(S, T), dtype=torch.float64), **F64)
    assert torch.equal(topk_overlap_BT(S, S), torch.ones(3, 9, dtype=torch.float64))


def naive_tied_overlap(S, logp, tol=1e-6):
    """max over every top-k set of the teacher (ties at the k-th value: any choice) of |S ∩ T| / k."""
    import itertools

    B, L, k = S.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            vals = logp[b, t].tolist()
            kth = sorted(vals, reverse=True)[k - 1]
            above = [v for v, x in enumerate(vals) if x > kth + tol]
            tied = [v for v, x in enumerate(vals) if abs(x - kth) <= tol]
            best = max(len(set(S[b, t].tolist()) & (set(above) | set(c))) for c in itertools.combinations(tied, k - len(above)))
            out[b, t] = best / k
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_tied_overlap_is_the_best_choice_among_tied_ids(k):
    V = 7
    logp = torch.randint(0, 3, (3, 6, V), generator=_gen(5)).double() - 2.0  # three values: many ties
    S = _distinct_ids(3, 6, k, V, 6)
    torch.testing.assert_close(tied_topk_overlap_BT(S, logp), naive_tied_overlap(S, logp), rtol=0, atol=0)
    no_ties = torch.randn(3, 6, V, generator=_gen(7), dtype=torch.float64)  # without ties: the plain set overlap
    torch.testing.assert_close(tied_topk_overlap_BT(S, no_ties), topk_overlap_BT(S, no_ties.topk(k, -1).indices), rtol=0, atol=0)


def test_tied_overlap_ignores_the_order_topk_breaks_ties_in():
    """The noise-free oracle: the intended word, 20 live words tied 8 nats below it, 3 dead ids.
    A student whose top-8 holds the intended word and 7 live words agrees fully with one of
    the oracle's equally valid top-8 sets, whichever 7 tied ids ``topk`` happens to return."""
    V, intended, dead = 24, 5, [0, 1, 2]
    logp = torch.full((1, 1, V), -8.007, dtype=torch.float64)
    logp[..., intended], logp[..., dead] = -0.008, -38.0
    live = [v for v in range(V) if v not in dead + [intended]]
    for others in (live[:7], live[-7:], live[3:10]):
        S = torch.tensor([[[intended] + others]])
        assert float(tied_topk_overlap_BT(S, logp)) == 1.0
    assert float(tied_topk_overlap_BT(torch.tensor([[live[:8]]]), logp)) == 7 / 8  # the intended word missing
    assert float(tied_topk_overlap_BT(torch.tensor([[[intended] + dead + live[:4]]]), logp)) == 5 / 8
    assert float(tied_topk_overlap_BT(torch.tensor([[[live[0]]]]), logp)) == 0.0  # k = 1: top-1 agreement
    assert float(tied_topk_overlap_BT(torch.tensor([[[intended]]]), logp)) == 1.0


def naive_reliability(overlap, mask, delta, eta, w_min):
    B, T = overlap.shape
    drift, w, keep = torch.zeros(B, T, dtype=torch.bool), torch.ones(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        count = 0
        for t in range(T):
            if mask[b, t] and overlap[b, t] < delta:
                count += 1
                drift[b, t] = True
            w[b, t] = eta**count
            keep[b, t] = bool(mask[b, t]) and eta**count >= w_min
    return drift, w, keep


@pytest.mark.parametrize("delta,eta,w_min", [(0.5, 0.9, 0.3), (0.0, 0.5, 0.5), (1.01, 0.7, 0.0), (0.3, 1.0, 0.99)])
def test_drift_reliability_and_mask_against_loops(delta, eta, w_min):
    overlap = torch.randint(0, 5, (4, 23), generator=_gen(3)).double() / 4
    mask = _prefix_mask(4, 23, 4)
    drift, w = drift_reliability_BT(overlap, mask, delta=delta, eta=eta)
    keep = reliable_mask_BT(w, mask, w_min=w_min)
    n_drift, n_w, n_keep = naive_reliability(overlap, mask, delta, eta, w_min)
    assert torch.equal(drift, n_drift) and torch.equal(keep, n_keep)
    assert torch.allclose(w, n_w, **F64)
    lengths = keep.sum(-1)  # the kept tokens are a prefix of each row
    assert torch.equal(keep, torch.arange(23)[None, :] < lengths[:, None])


def naive_quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantile,grow", [(0.5, 1.25), (0.1, 2.0), (0.9, 1.0)])
def test_next_budget_against_rule(seed, quantile, grow):
    budget = 40
    generated = torch.randint(1, budget + 1, (8,), generator=_gen(seed))
    reliable = torch.minimum(generated, torch.randint(0, budget + 1, (8,), generator=_gen(seed + 50)))
    if seed % 2:
        reliable = generated.clone()
        reliable[:2] = 0  # 6 of 8 stay reliable: grow
    frac = sum(int(r) >= int(g) for r, g in zip(reliable, generated)) / 8
    want = math.ceil(budget * grow) if frac > 0.5 else min(budget, math.ceil(naive_quantile(reliable.tolist(), quantile)))
    assert next_budget(budget, reliable, generated, grow=grow, quantile=quantile) == want


def _fake_exp(B, T, V, seed, K, min_len=1):
    g = _gen(seed)
    mask = _prefix_mask(B, T, seed, min_len=min_len)
    comps = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in mask.sum(-1)]
    batch = make_batch([[1, 2, 3]] * B, comps, pad_id=0, width=T)
    sampler = torch.where(batch.completion_mask_BT, -torch.rand(B, T, generator=g, dtype=torch.float64) * 3, 0.0)
    exp = Experience(batch, [None] * B, torch.arange(B), sampler_logp_BT=sampler)
    exp.extra["student_topk_ids_BTK"] = _distinct_ids(B, T, K, V, seed + 7)
    exp.extra["budget_B"] = torch.full((B,), T)
    return exp


def _fake_scores(exp, V, K, seed, logits=None):
    g = _gen(seed)
    logits = torch.randn(*exp.batch.completion_mask_BT.shape, V, generator=g, dtype=torch.float64) * 2 if logits is None else logits
    logp = torch.log_softmax(logits, -1)
    token = logp.gather(-1, exp.batch.completion_ids_BT[..., None]).squeeze(-1)
    top = logp.topk(K, -1)
    return Scores(token, torch.zeros_like(token), top.indices, top.values, logits)


def naive_prune_adv(exp, scores, delta, eta, w_min, gamma, kl_coef):
    S, T = exp.extra["student_topk_ids_BTK"], scores.topk_ids_BTK
    mask = exp.batch.completion_mask_BT
    ov = torch.tensor(naive_overlap(S, T), dtype=torch.float64)
    _, w, keep = naive_reliability(ov, mask, delta, eta, w_min)
    r = -kl_coef * (exp.sampler_logp_BT - scores.token_logp_BT) * w
    B, L = mask.shape
    adv = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            if keep[b, t]:
                adv[b, t] = sum(gamma ** (u - t) * r[b, u] for u in range(t, L) if keep[b, u])
    return adv, keep


@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_prune_signal_and_loss_gradient_against_naive(gamma):
    V, K = 12, 4
    exp = _fake_exp(5, 17, V, 11, K)
    scores = _fake_scores(exp, V, K, 12)
    budget = adaptive_budget(17)
    kw = dict(delta=0.5, eta=0.8, w_min=0.4, quantile=0.5, grow=1.25, gamma=gamma, kl_coef=1.3)
    sig = prune_signal(exp, scores, budget, **kw)
    want_adv, want_keep = naive_prune_adv(exp, scores, 0.5, 0.8, 0.4, gamma, 1.3)
    assert torch.equal(sig["mask_BT"], want_keep)
    assert torch.allclose(sig["adv_BT"], want_adv, **F64)
    reliable, generated = want_keep.sum(-1), exp.batch.completion_mask_BT.sum(-1)
    assert budget(1) == max(1, min(17, next_budget(17, reliable, generated, grow=1.25, quantile=0.5)))
    # on-policy the loss gradient is -A_t / N on kept tokens, 0 elsewhere
    method = METHODS["prune_opd"]()
    logp = exp.sampler_logp_BT.clone().requires_grad_(True)
    loss_BT, _ = method.loss(StudentView(torch.zeros(5, 17, V, dtype=torch.float64), logp), sig)
    n = sig["mask_BT"].sum()
    masked_token_mean(loss_BT, sig["mask_BT"], n).backward()
    assert torch.allclose(logp.grad, torch.where(want_keep, -want_adv / n, 0.0), **F64)


def test_prune_signal_is_finite_on_hostile_inputs():
    V, K = 6, 3
    exp = _fake_exp(3, 9, V, 13, K, min_len=0)
    exp.batch.completion_mask_BT[0] = False  # a fully masked row
    logits = torch.full((3, 9, V), -math.inf, dtype=torch.float64)
    logits[..., 0] = 0.0  # one-hot teacher: the sampled token's log-prob is -inf almost everywhere
    logits[2, :, 1] = 1e4
    scores = _fake_scores(exp, V, K, 14, logits=logits)
    budget = adaptive_budget(9)
    sig = prune_signal(exp, scores, budget, delta=0.5, eta=0.5, w_min=0.3, quantile=0.5, grow=1.25, gamma=1.0, kl_coef=1.0)
    for key, val in sig.items():
        assert torch.isfinite(val.double()).all(), key
    assert not sig["mask_BT"][0].any() and 1 <= budget(1) <= 9


# --- suffix-fade signals -------------------------------------------------------------


def test_candidate_logp_and_margins_against_loops():
    V, K = 11, 4
    logits = torch.randn(3, 8, V, generator=_gen(20), dtype=torch.float64) * 3
    ids = _distinct_ids(3, 8, K, V, 21)
    sampled = torch.randn(3, 8, generator=_gen(22), dtype=torch.float64) - 2
    cand = candidate_logp_BTK(logits, ids)
    gap, samp = teacher_margin_BT(cand, sampled, mode="gap"), teacher_margin_BT(cand, sampled, mode="sampled")
    for b in range(3):
        for t in range(8):
            lp = torch.log_softmax(logits[b, t], -1)
            vals = sorted((float(lp[i]) for i in ids[b, t]), reverse=True)
            assert math.isclose(float(cand[b, t].max()), vals[0], rel_tol=1e-12)
            assert math.isclose(float(gap[b, t]), vals[0] - vals[1], rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(float(samp[b, t]), float(sampled[b, t]) - vals[0], rel_tol=1e-9, abs_tol=1e-12)
    with pytest.raises(ValueError, match="2 candidates"):
        teacher_margin_BT(cand[..., :1], sampled, mode="gap")


def test_margins_are_finite_on_hostile_logits():
    logits = torch.full((2, 3, 6), -math.inf, dtype=torch.float64)
    logits[..., 0] = 0.0  # one-hot teacher: every other id has log-prob -inf
    logits[1, :, 1] = 1e4  # extremely peaked on another id
    ids = torch.tensor([1, 2, 3]).expand(2, 3, 3)
    cand = candidate_logp_BTK(logits, ids)
    sampled = torch.tensor([[-math.inf, 0.0, float("nan")]] * 2, dtype=torch.float64)
    for mode in ("gap", "sampled"):
        m = teacher_margin_BT(cand, sampled, mode=mode)
        assert torch.isfinite(m).all()
    assert torch.allclose(teacher_margin_BT(cand, sampled, mode="gap")[0], torch.zeros(3, dtype=torch.float64))
    assert float(teacher_margin_BT(cand, sampled, mode="gap")[1, 0]) == -LOGP_FLOOR


def naive_segments(boundary, mask):
    B, T = mask.shape
    seg = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        s = 0
        for t in range(T):
            seg[b, t] = s
            if mask[b, t] and boundary[b, t]:
                s += 1
    return seg


def test_segments_and_step_means_against_loops():
    mask = _prefix_mask(4, 30, 30)
    boundary = torch.rand(4, 30, generator=_gen(31)) < 0.2
    values = torch.randn(4, 30, generator=_gen(32), dtype=torch.float64)
    seg = segment_ids_BT(boundary, mask)
    assert torch.equal(torch.where(mask, seg, 0), torch.where(mask, naive_segments(boundary, mask), 0))
    means, counts = step_means_BS(values, seg, mask)
    for b in range(4):
        steps = {}
        for t in range(30):
            if mask[b, t]:
                steps.setdefault(int(seg[b, t]), []).append(float(values[b, t]))
        assert int((counts[b] > 0).sum()) == len(steps) and sorted(steps) == list(range(len(steps)))
        for s, vals in steps.items():
            assert math.isclose(float(means[b, s]), sum(vals) / len(vals), rel_tol=1e-12, abs_tol=1e-12)
            assert int(counts[b, s]) == len(vals)
    win = window_boundaries_BT(mask, 4)
    assert torch.equal(win[0], torch.tensor([(t + 1) % 4 == 0 for t in range(30)]))


def naive_change_point(m, penalty, min_steps=3, eps=1e-9):
    n = len(m)
    if n < min_steps:
        return n
    mean = lambda xs: sum(xs) / len(xs)
    rss = lambda xs: sum((x - mean(xs)) ** 2 for x in xs)
    best, best_tau = math.inf, None
    for tau in range(1, n):
        left, right = m[:tau], m[tau:]
        if mean(right) < mean(left) and rss(left) + rss(right) < best:
            best, best_tau = rss(left) + rss(right), tau
    if best_tau is None:
        return n
    return best_tau if n * math.log((rss(m) + eps) / (best + eps)) > penalty * math.log(n) else n


@pytest.mark.parametrize("penalty", [0.0, 1.0, 2.0, 6.0])
def test_change_point_against_naive_bic(penalty):
    B, S = 40, 12
    g = _gen(40 + int(penalty))
    n = torch.randint(0, S + 1, (B,), generator=g)
    means = torch.randn(B, S, generator=g, dtype=torch.float64)
    means[::3, 5:] -= 3.0  # planted drops in some rows
    valid = torch.arange(S)[None, :] < n[:, None]
    got = change_point_B(means, valid, penalty=penalty)
    want = [naive_change_point(means[b, : int(n[b])].tolist(), penalty) for b in range(B)]
    assert got.tolist() == want
    assert any(w < int(k) for w, k in zip(want, n))  # the test sees accepted change points


def test_change_point_finds_planted_drop_and_ignores_rises():
    flat, drop = [2.0] * 4, [0.1] * 4
    noise = [0.01, -0.02, 0.015, 0.0]
    rows = torch.tensor(
        [[a + e for a, e in zip(flat + drop, noise + noise)], [a + e for a, e in zip(drop + flat, noise + noise)], [1.0] * 8],
        dtype=torch.float64,
    )
    got = change_point_B(rows, torch.ones(3, 8, dtype=torch.bool), penalty=1.0)
    assert got.tolist() == [4, 8, 8]
    seg = torch.arange(8).repeat_interleave(2)[None].expand(3, 16)
    keep = fade_mask_BT(seg, torch.ones(3, 16, dtype=torch.bool), got)
    assert keep.sum(-1).tolist() == [8, 16, 16] and keep[0, :8].all()


def test_fade_signal_against_naive_and_hostile_rows():
    V, K = 9, 3
    exp = _fake_exp(6, 20, V, 60, K, min_len=0)
    exp.extra["boundary_BT"] = (exp.batch.completion_ids_BT % 4 == 0) & exp.batch.completion_mask_BT
    logits = torch.randn(6, 20, V, generator=_gen(61), dtype=torch.float64)
    logits[:, 10:] *= 0.05  # the teacher's contrast collapses in the suffix
    logits[0] = -math.inf
    logits[0, :, 2] = 50.0  # one-hot teacher row
    exp.batch.completion_mask_BT[1] = False  # a fully masked row
    scores = _fake_scores(exp, V, K, 62, logits=logits)
    sig = fade_signal(exp, scores, margin="gap", penalty=1.0, gamma=0.0, kl_coef=1.0)
    for key, val in sig.items():
        assert torch.isfinite(val.double()).all(), key
    mask = exp.batch.completion_mask_BT
    margin = teacher_margin_BT(candidate_logp_BTK(logits, exp.extra["student_topk_ids_BTK"]), scores.token_logp_BT, mode="gap")
    seg = naive_segments(exp.extra["boundary_BT"], mask)
    for b in range(6):
        n_tok = int(mask[b].sum())
        steps = {}
        for t in range(n_tok):
            steps.setdefault(int(seg[b, t]), []).append(float(margin[b, t]))
        tau = naive_change_point([sum(v) / len(v) for _, v in sorted(steps.items())], 1.0)
        want = [bool(t < n_tok and seg[b, t] < tau) for t in range(20)]
        assert sig["mask_BT"][b].tolist() == want
        adv = torch.where(torch.tensor(want), -(exp.sampler_logp_BT[b] - scores.token_logp_BT[b].clamp(min=-100.0)), 0.0)
        assert torch.allclose(sig["adv_BT"][b], adv, **F64)
    assert not sig["mask_BT"][1].any()


def test_boundary_ids_of_the_testbed_tokenizer():
    from opd.run.setup import boundary_ids
    from opd.testbed.tokenizer import VOCAB, build_tokenizer

    assert boundary_ids(build_tokenizer()) == (VOCAB.index(";"),)


# --- training runs -------------------------------------------------------------------


def _loss_metrics_finite(rows):
    losses = [v for r in rows[1:] for k, v in r.items() if k.startswith("loss/")]
    return losses and all(v is not None and math.isfinite(v) for v in losses)


@pytest.mark.parametrize("method,changes", [("trunc", dict(trunc_tokens=6)), ("topd", dict(horizon_frac=0.2)), ("suffix_fade", {})])
def test_method_trains_two_steps(method, changes, tiny_cfg):
    cfg = tiny_cfg(method=method, eval_size=1, eval_k=1, **changes)
    run = Run(cfg)
    if method == "suffix_fade":
        from opd.testbed.tokenizer import VOCAB

        assert run.setup.env.boundary_ids == (VOCAB.index(";"),)
    before = {k: v.clone() for k, v in run.setup.env.student.state_dict().items()}
    run.fit()
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2] and _loss_metrics_finite(rows)
    after = AutoModelForCausalLM.from_pretrained(f"{cfg.run_dir}/checkpoints/step_000002").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if method == "suffix_fade":
        assert 0.0 <= rows[-1]["signal/change_point"] <= 1.0 and rows[-1]["signal/kept_frac"] > 0
    else:
        cap = 6 if method == "trunc" else 8  # 0.2 · max_new_tokens=40
        assert all(r["rollout/budget"] == cap and r["rollout/length"] <= cap for r in rows[1:])


@pytest.mark.parametrize("method,changes", [("popd", dict(popd_schedule="geometric")), ("prune_opd", {})])
def test_resumed_run_continues_the_budget(method, changes, tiny_cfg, tmp_path):
    kw = dict(method=method, steps=3, eval_size=1, eval_k=1, **changes)
    straight = tiny_cfg(run_dir=str(tmp_path / "a"), **kw)
    train(straight)
    Run(tiny_cfg(run_dir=str(tmp_path / "b"), **kw)).fit(stop_after=1)
    resumed = Run(tiny_cfg(run_dir=str(tmp_path / "b"), resume=True, **kw))
    a_rows, b_first = read_metrics(straight.run_dir), read_metrics(str(tmp_path / "b"))
    state = resumed.setup.method.state
    saved = torch.load(tmp_path / "b/checkpoints/step_000001/trainer_state.pt", weights_only=False)["method_state"]
    assert saved == state.state_dict() and saved["schedule"] == ("geometric" if method == "popd" else "adaptive")
    assert state(1) == a_rows[2]["rollout/budget"]  # the restored budget is the one step 1 used
    resumed.fit()
    b_rows = read_metrics(str(tmp_path / "b"))
    budgets = [r["rollout/budget"] for r in a_rows[1:]]
    assert [r["rollout/budget"] for r in b_rows[1:]] == budgets and _loss_metrics_finite(a_rows)
    if method == "popd":
        assert budgets == [4, 13, 40]  # geometric from round(0.1 · 40) = 4 to 40 over 3 steps
    else:
        assert {"signal/drift_rate", "signal/reliable_len"} <= set(a_rows[-1]) and b_first[1]["rollout/budget"] == 40
        assert budgets[1] != 40  # the budget adapted, so a state lost on resume would show
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a/checkpoints/step_000003").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b/checkpoints/step_000003").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
