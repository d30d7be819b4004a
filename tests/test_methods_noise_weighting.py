"""Local-noise fixes that reweight tokens and rows (METHODS §8-9): scope and eopd against naive
references; every local-noise method's builder checks and a two-step run."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.methods import build_method
from opd.methods.base import StudentView
from opd.methods.eopd import eopd_loss, eopd_signal
from opd.methods.scope import scope_loss, scope_signal
from opd.run.metrics_log import read_metrics
from opd.run.runner import train
from opd.signals.eopd import eopd_combine, uncertain_mask
from opd.signals.scope import group_softmax_weights, scope_advantages, scope_weights

from noise_fakes import D, TOL, fake_exp, fake_scores, finite, gen, naive_fkl_topk, randn

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
