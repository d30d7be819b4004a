"""Policy-gradient pieces against naive, loop-by-loop references; hostile inputs."""

import math
import statistics
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.losses import masked_token_mean
from opd.losses.pg import (
    clamp_log_ratio,
    discounted_returns,
    grpo_advantages,
    importance_sampling_loss,
    perplexity,
    ppo_clip_loss,
    sequence_mean_logp,
)

TOL = {torch.float64: dict(rtol=1e-6, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}
DTYPES = [torch.float64, torch.float32]


def _randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _mask(B, T, seed, holes):
    """Right-padded masks, or arbitrary ones (holes) when asked."""
    g = torch.Generator().manual_seed(seed + 1000)
    if holes:
        return torch.rand(B, T, generator=g) < 0.7
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    return torch.arange(T)[None, :] < lengths[:, None]


def _t(x, dtype):
    return torch.tensor(x, dtype=dtype)


# --- discounted returns -------------------------------------------------------------


def naive_returns(rewards, mask, gamma):
    B, T = len(rewards), len(rewards[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b][t]:
                out[b][t] = sum(gamma ** (u - t) * rewards[b][u] for u in range(t, T) if mask[b][u])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.95, 1.0])
@pytest.mark.parametrize("T", [1, 7, 150])
@pytest.mark.parametrize("holes", [False, True])
def test_returns_match_naive(dtype, gamma, T, holes):
    rewards = _randn((3, T), dtype, seed=T)
    mask = _mask(3, T, seed=T, holes=holes)
    out = discounted_returns(rewards, mask, gamma)
    ref = naive_returns(rewards.tolist(), mask.tolist(), gamma)
    assert out.dtype == dtype
    torch.testing.assert_close(out, _t(ref, dtype), **TOL[dtype])


def test_returns_crafted_stop_at_eos_and_ignore_padding():
    nan = math.nan
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, nan, 100.0], [nan, 5.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    out = discounted_returns(rewards, mask, gamma=0.5)
    expected = torch.tensor(
        [
            [1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 4, 2 + 0.5 * 3 + 0.25 * 4, 3 + 0.5 * 4, 4.0],
            [1 + 0.5 * 2, 2.0, 0.0, 0.0],  # stops at the sequence end, padding is garbage
            [0.0, 5 + 0.25 * 9, 0.0, 9.0],  # a hole contributes 0, still a discount step
        ]
    )
    torch.testing.assert_close(out, expected)


def test_returns_special_gammas():
    rewards = _randn((4, 9), torch.float64, seed=2)
    mask = _mask(4, 9, seed=2, holes=False)
    per_token = discounted_returns(rewards, mask, 0.0)
    assert torch.equal(per_token, torch.where(mask, rewards, 0.0))
    to_go = discounted_returns(rewards, mask, 1.0)
    masked = torch.where(mask, rewards, 0.0)
    ref = torch.where(mask, masked.flip(-1).cumsum(-1).flip(-1), 0.0)
    torch.testing.assert_close(to_go, ref, rtol=1e-12, atol=1e-12)


def test_returns_small_gamma_long_sequence_is_exact_and_finite():
    rewards = _randn((2, 300), torch.float64, seed=4)
    mask = torch.ones(2, 300, dtype=torch.bool)
    out = discounted_returns(rewards, mask, 1e-3)
    assert torch.isfinite(out).all()
    ref = naive_returns(rewards.tolist(), mask.tolist(), 1e-3)
    torch.testing.assert_close(out, _t(ref, torch.float64), **TOL[torch.float64])


def test_returns_detached_and_validated():
    rewards = torch.randn(2, 5, requires_grad=True)
    out = discounted_returns(rewards, torch.ones(2, 5, dtype=torch.bool), 0.9)
    assert not out.requires_grad
    with pytest.raises(ValueError):
        discounted_returns(rewards, torch.ones(2, 5, dtype=torch.bool), 1.5)


# --- importance sampling --------------------------------------------------------------


def naive_is(logp, sampler, adv):
    """Per-token loss and d loss / d logp, element by element."""
    loss = [[-math.exp(l - s) * a for l, s, a in zip(*row)] for row in zip(logp, sampler, adv)]
    return loss, loss  # d/dlogp of -exp(l - s) * a is the same expression


def _pg_inputs(dtype, seed, B=3, T=6, spread=0.5):
    logp = _randn((B, T), dtype, seed, scale=0.3) - 1.0
    sampler = logp + _randn((B, T), dtype, seed + 1, scale=spread)
    adv = _randn((B, T), dtype, seed + 2)
    return logp.requires_grad_(), sampler, adv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_is_loss_matches_naive(dtype, seed):
    logp, sampler, adv = _pg_inputs(dtype, seed)
    loss, metrics = importance_sampling_loss(logp, sampler, adv)
    loss.sum().backward()
    ref, ref_grad = naive_is(logp.tolist(), sampler.tolist(), adv.tolist())
    torch.testing.assert_close(loss, _t(ref, dtype), **TOL[dtype])
    torch.testing.assert_close(logp.grad, _t(ref_grad, dtype), **TOL[dtype])
    torch.testing.assert_close(metrics["pg/ratio"], (logp - sampler).exp().detach(), **TOL[dtype])
    assert not metrics["pg/ratio"].requires_grad


def test_is_grad_at_ratio_one_is_minus_adv_and_nothing_flows_to_sg_terms():
    logp = _randn((2, 5), torch.float64, seed=0).requires_grad_()
    sampler = logp.detach().clone().requires_grad_()
    adv = _randn((2, 5), torch.float64, seed=1).requires_grad_()
    loss, _ = importance_sampling_loss(logp, sampler, adv)
    torch.testing.assert_close(loss, -adv.detach())
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv.detach())
    assert sampler.grad is None and adv.grad is None


def test_is_log_ratio_limit():
    logp = torch.tensor([[0.0, -30.0, -1.0]], dtype=torch.float64, requires_grad=True)
    sampler = torch.tensor([[-30.0, 0.0, -1.5]], dtype=torch.float64)
    adv = torch.ones(1, 3, dtype=torch.float64)
    loss, _ = importance_sampling_loss(logp, sampler, adv, log_ratio_limit=20.0)
    loss.sum().backward()
    f64 = torch.float64
    torch.testing.assert_close(loss, -torch.tensor([[math.exp(20), math.exp(-20), math.exp(0.5)]], dtype=f64))
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -math.exp(0.5)]], dtype=f64))
    raw, _ = importance_sampling_loss(logp, sampler, adv, log_ratio_limit=None)
    torch.testing.assert_close(raw, -(logp - sampler).exp())


# --- PPO ------------------------------------------------------------------------------


def naive_ppo(logp, sampler, adv, clip_low, clip_high, dual_clip):
    """Per-token (loss, d loss / d logp, clipped?, dual clipped?) by cases."""
    loss, grad, clipped, dual = [], [], [], []
    for lrow, srow, arow in zip(logp, sampler, adv):
        rows = ([], [], [], [])
        for l, s, a in zip(lrow, srow, arow):
            r = math.exp(l - s)
            unclipped = -r * a
            clipped_value = -min(max(r, 1 - clip_low), 1 + clip_high) * a
            value, g = (unclipped, -a * r) if unclipped >= clipped_value else (clipped_value, 0.0)
            is_dual = dual_clip is not None and a < 0 and value > -dual_clip * a
            if is_dual:
                value, g = -dual_clip * a, 0.0
            was_clipped = (a > 0 and r > 1 + clip_high) or (a < 0 and r < 1 - clip_low)
            for out, x in zip(rows, (value, g, float(was_clipped), float(is_dual))):
                out.append(x)
        for out, x in zip((loss, grad, clipped, dual), rows):
            out.append(x)
    return loss, grad, clipped, dual


CLIPS = [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0), (0.2, 0.2, 1.5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clips", CLIPS)
@pytest.mark.parametrize("seed", range(3))
def test_ppo_matches_naive(dtype, clips, seed):
    clip_low, clip_high, dual_clip = clips
    logp, sampler, adv = _pg_inputs(dtype, seed, B=4, T=16, spread=0.8)
    loss, metrics = ppo_clip_loss(
        logp, sampler, adv, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    loss.sum().backward()
    ref, ref_grad, ref_clipped, ref_dual = naive_ppo(
        logp.tolist(), sampler.tolist(), adv.tolist(), clip_low, clip_high, dual_clip
    )
    torch.testing.assert_close(loss, _t(ref, dtype), **TOL[dtype])
    torch.testing.assert_close(logp.grad, _t(ref_grad, dtype), **TOL[dtype])
    assert torch.equal(metrics["pg/clip_frac"], _t(ref_clipped, dtype))
    assert torch.equal(metrics["pg/dual_clip_frac"], _t(ref_dual, dtype))
    clipped = metrics["pg/clip_frac"].bool() | metrics["pg/dual_clip_frac"].bool()
    assert clipped.any() and (~clipped).any()  # both cases exercised
    assert logp.grad[clipped].eq(0).all()
    torch.testing.assert_close(
        metrics["pg/clip_frac"], metrics["pg/clip_frac_low"] + metrics["pg/clip_frac_high"]
    )


def test_ppo_crafted_cases():
    # columns: (ratio, A) = (1.5, 1), (0.5, 1), (0.5, -1), (4, -1), (2, -1), (1.1, 2)
    ratio = torch.tensor([[1.5, 0.5, 0.5, 4.0, 2.0, 1.1]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    logp = ratio.log().requires_grad_()
    sampler = torch.zeros_like(ratio)
    loss, m = ppo_clip_loss(logp, sampler, adv, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    loss.sum().backward()
    f64 = torch.float64
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 0.8, 3.0, 2.0, -2.2]], dtype=f64))
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 0.0, 0.0, 2.0, -2.2]], dtype=f64))
    assert m["pg/clip_frac_high"].tolist() == [[1, 0, 0, 0, 0, 0]]
    assert m["pg/clip_frac_low"].tolist() == [[0, 0, 1, 0, 0, 0]]
    assert m["pg/dual_clip_frac"].tolist() == [[0, 0, 0, 1, 0, 0]]
    # the clip fraction is the masked token mean of the indicator
    clip_frac = masked_token_mean(m["pg/clip_frac"], torch.ones(1, 6, dtype=torch.bool))
    assert clip_frac.item() == pytest.approx(2 / 6)


def test_ppo_on_policy_equals_is_gradient_and_validates():
    logp = _randn((2, 5), torch.float64, seed=3).requires_grad_()
    adv = _randn((2, 5), torch.float64, seed=4)
    loss, _ = ppo_clip_loss(logp, logp.detach(), adv, dual_clip=2.0)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, -adv)
    with pytest.raises(ValueError):
        ppo_clip_loss(logp, logp, adv, dual_clip=1.0)
    with pytest.raises(ValueError):
        ppo_clip_loss(logp, logp, adv, clip_low=-0.1)


# --- GRPO -----------------------------------------------------------------------------


def naive_grpo(rewards, scale, eps):
    out = []
    for group in rewards:
        mean = statistics.fmean(group)
        std = statistics.stdev(group) if len(group) > 1 else 0.0
        centered = [0.0 if len(set(group)) == 1 else r - mean for r in group]
        out.append([c / (std + eps) for c in centered] if scale == "std" else centered)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_grpo_matches_naive(dtype, scale, G):
    rewards = _randn((5, G), dtype, seed=G)
    rewards[0] = 0.7  # a zero-variance group
    out = grpo_advantages(rewards, scale=scale, eps=1e-6)
    ref = naive_grpo(rewards.tolist(), scale, 1e-6)
    torch.testing.assert_close(out, _t(ref, dtype), **TOL[dtype])
    assert out[0].eq(0).all()


def test_grpo_binary_rewards_and_degenerate_groups():
    rewards = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = grpo_advantages(rewards)
        single = grpo_advantages(torch.tensor([[0.3], [1.0]]))
    std = statistics.stdev([1, 0, 0, 1])
    centered = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [0.0] * 4])
    expected = centered / torch.tensor([[std + 1e-6], [1e-6], [1e-6]])
    torch.testing.assert_close(out, expected)
    assert torch.equal(single, torch.zeros(2, 1))
    one_group = grpo_advantages(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(one_group, torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-6))


def test_grpo_detached_and_validated():
    rewards = torch.randn(2, 4, requires_grad=True)
    assert not grpo_advantages(rewards).requires_grad
    with pytest.raises(ValueError):
        grpo_advantages(rewards, scale="mad")


# --- sequence log-prob, perplexity, clamp ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_mean_logp_and_perplexity_match_naive(dtype):
    logp = (-_randn((4, 7), dtype, seed=9).abs()).requires_grad_()
    mask = _mask(4, 7, seed=9, holes=True)
    mask[3] = False
    mean = sequence_mean_logp(logp, mask)
    mean.sum().backward()
    ref, ref_grad = [], []
    for row, m in zip(logp.tolist(), mask.tolist()):
        n = sum(m)
        ref.append(sum(v for v, k in zip(row, m) if k) / n if n else 0.0)
        ref_grad.append([(1.0 / n if k else 0.0) for k in m])
    torch.testing.assert_close(mean, _t(ref, dtype), **TOL[dtype])
    torch.testing.assert_close(logp.grad, _t(ref_grad, dtype), **TOL[dtype])
    ppl = perplexity(logp, mask)
    torch.testing.assert_close(ppl, _t([math.exp(-x) for x in ref], dtype), **TOL[dtype])
    assert mean[3].item() == 0.0 and ppl[3].item() == 1.0


def test_fully_masked_sequence_with_neg_inf_padding():
    logp = torch.tensor([[-math.inf, -math.inf], [-0.5, -math.inf]], requires_grad=True)
    mask = torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)
    ppl = perplexity(logp, mask)
    ppl.sum().backward()
    torch.testing.assert_close(ppl, torch.tensor([1.0, math.exp(0.5)]))
    assert torch.isfinite(logp.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp_log_ratio(dtype):
    x = torch.tensor([-12.0, -5.0, -0.3, 0.0, 4.9, 7.0, 1e4], dtype=dtype, requires_grad=True)
    out = clamp_log_ratio(x, 5.0)
    out.sum().backward()
    ref = [min(max(v, -5.0), 5.0) for v in x.tolist()]
    ref_grad = [1.0 if -5.0 <= v <= 5.0 else 0.0 for v in x.tolist()]
    assert torch.equal(out, _t(ref, dtype)) and torch.equal(x.grad, _t(ref_grad, dtype))
    assert clamp_log_ratio(x, None) is x
    with pytest.raises(ValueError):
        clamp_log_ratio(x, 0.0)


# --- hostile inputs -------------------------------------------------------------------

FINITE = st.floats(-1e4, 1e4, allow_nan=False) | st.sampled_from([-1e4, 1e4, 0.0])
LOGP = FINITE | st.just(-math.inf)


@st.composite
def hostile_batch(draw):
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    n = B * T
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))

    def tensor(elements):
        values = draw(st.lists(elements, min_size=n, max_size=n))
        return torch.tensor(values, dtype=torch.float64).to(dtype).view(B, T)

    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))).view(B, T)
    return tensor(LOGP), tensor(LOGP), tensor(FINITE), mask


def _all_finite(*tensors):
    return all(torch.isfinite(x).all() for x in tensors)


@settings(max_examples=60, deadline=None)
@given(hostile_batch(), st.sampled_from([None, 3.0]))
def test_pg_losses_hostile_inputs_stay_finite(batch, dual_clip):
    logp, sampler, adv, mask = batch
    for loss_fn in (importance_sampling_loss, lambda *a: ppo_clip_loss(*a, dual_clip=dual_clip)):
        lp = logp.clone().requires_grad_()
        loss_BT, metrics = loss_fn(lp, sampler, adv)
        total = masked_token_mean(loss_BT, mask)
        total.backward()
        assert _all_finite(loss_BT, total, lp.grad, *metrics.values())
        assert lp.grad.dtype == logp.dtype


@settings(max_examples=60, deadline=None)
@given(hostile_batch(), st.sampled_from([0.0, 0.5, 1.0]))
def test_signals_hostile_inputs_stay_finite(batch, gamma):
    logp, _, rewards, mask = batch
    rewards = torch.where(mask, rewards, math.nan)  # garbage in the padding
    assert _all_finite(discounted_returns(rewards, mask, gamma))
    assert _all_finite(grpo_advantages(torch.where(mask, rewards, 0.0)))
    lp = torch.where(mask, logp.clamp(min=-50.0), -math.inf).requires_grad_()
    ppl = perplexity(lp, mask)
    ppl.sum().backward()
    assert _all_finite(ppl, sequence_mean_logp(lp, mask), lp.grad)


# --- NaN: refused as an argument; selected away at a masked position -------------------


def test_nan_float_arguments_are_refused():
    logp = _randn((2, 5), torch.float64, seed=80)
    for kw, msg in [
        (dict(clip_low=math.nan), "clip_low and clip_high must be >= 0, got nan and 0.2"),
        (dict(clip_high=math.nan), "clip_low and clip_high must be >= 0, got 0.2 and nan"),
        (dict(dual_clip=math.nan), "dual_clip must be > 1, got nan"),
        (dict(log_ratio_limit=math.nan), "limit must be > 0, got nan"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ppo_clip_loss(logp, logp, logp, **kw)
    with pytest.raises(ValueError, match="limit must be > 0, got nan"):
        importance_sampling_loss(logp, logp, logp, log_ratio_limit=math.nan)
    with pytest.raises(ValueError, match="eps must be finite and >= 0, got nan"):
        grpo_advantages(logp, eps=math.nan)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got nan"):
        discounted_returns(logp, logp > 0, math.nan)


LOSSES = [importance_sampling_loss, lambda *a: ppo_clip_loss(*a, dual_clip=3.0)]


@pytest.mark.parametrize("loss_fn", LOSSES, ids=["is", "ppo"])
@pytest.mark.parametrize("where", ["logp", "sampler", "adv"])
def test_nan_input_at_masked_position_reaches_no_gradient(loss_fn, where):
    inputs = [_randn((2, 4), torch.float64, seed=s) for s in (81, 82, 83)]
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False

    def loss_and_grad(inputs):
        logp = inputs[0].clone().requires_grad_()
        loss = masked_token_mean(loss_fn(logp, inputs[1], inputs[2])[0], mask)
        return loss, torch.autograd.grad(loss, logp)[0]

    bad = [x.clone() for x in inputs]
    bad[["logp", "sampler", "adv"].index(where)][1, 3] = math.nan
    (loss, g), (clean_loss, clean_g) = loss_and_grad(bad), loss_and_grad(inputs)
    assert torch.isfinite(g).all()
    torch.testing.assert_close((loss, g[mask]), (clean_loss, clean_g[mask]), rtol=0, atol=0)
    bad[["logp", "sampler", "adv"].index(where)][0, 0] = math.nan  # kept: a NaN loss, never a silent 0
    loss, g = loss_and_grad(bad)
    assert torch.isnan(loss) and torch.isfinite(g).all()


def test_nan_logp_at_masked_position_in_sequence_statistics():
    logp = _randn((2, 4), torch.float64, seed=84)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    for fn in (sequence_mean_logp, perplexity):
        clean = logp.clone().requires_grad_()
        bad = logp.clone()
        bad[~mask] = math.nan
        bad.requires_grad_()
        (g,) = torch.autograd.grad(fn(bad, mask).sum(), bad)
        (g_clean,) = torch.autograd.grad(fn(clean, mask).sum(), clean)
        torch.testing.assert_close(g, g_clean, rtol=0, atol=0)
