"""stable_opd, srpo, gopd and opd's gamma: signals and losses against naive references,
hostile inputs, rollouts on the tiny testbed, and two-step training runs."""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.batch import make_batch
from opd.losses import masked_token_mean
from opd.methods import build_method
from opd.methods.base import Experience, StudentView
from opd.methods.gopd import gopd_signal
from opd.methods.opd import opd_signal
from opd.methods.srpo import srpo_loss, srpo_signal
from opd.methods.stable_opd import stable_loss, stable_signal
from opd.run.metrics_log import read_metrics
from opd.models.base import Scores
from opd.rollouts.student import student_rollout
from opd.run.runner import train
from opd.signals.gopd import gopd_advantages_BT
from opd.signals.srpo import confidence_BT, mean_normalize_BT, srpo_advantages_BT
from opd.signals.stable_opd import term_weights_BT
from opd.run.loop import loss_inputs

F64 = torch.float64
EOS, PAD, V = 2, 0, 11
TOL = dict(rtol=1e-6, atol=1e-8)


# --- fixtures: synthetic experience -------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _completions(B, T, seed, eos_rows=None):
    """Ragged completions of ids in [3, V); rows in ``eos_rows`` end with EOS."""
    rng = random.Random(seed)
    out = []
    for b in range(B):
        n = rng.randint(1, T)
        ids = [rng.randrange(3, V) for _ in range(n)]
        if eos_rows is None or b in eos_rows:
            ids[-1] = EOS
        out.append(ids)
    return out


def _experience(completions, *, group_size=1, rewards=None, seed=0, garbage=True):
    """An Experience over ``completions`` with float64 sampler log-probs; masked positions
    hold garbage (``-inf``/``nan``) that must never leak."""
    B = len(completions)
    batch = make_batch([[1, 5, 6]] * B, completions, PAD)
    mask_BT = batch.completion_mask_BT
    sampler = -torch.rand(mask_BT.shape, generator=_gen(seed), dtype=F64) * 3
    if garbage:
        sampler = torch.where(mask_BT, sampler, float("-inf"))
    return Experience(
        batch=batch,
        problems=[None] * B,
        group_B=torch.arange(B // group_size).repeat_interleave(group_size),
        sampler_logp_BT=sampler,
        rewards_B=None if rewards is None else torch.tensor(rewards, dtype=torch.float32),
        truncated_B=torch.tensor([c[-1] != EOS for c in completions]),
    )


def _scores(mask_BT, seed, garbage=True):
    g = _gen(seed + 7)
    logp = -torch.rand(mask_BT.shape, generator=g, dtype=F64) * 3
    ent = torch.rand(mask_BT.shape, generator=g, dtype=F64) * math.log(V)
    if garbage:
        logp = torch.where(mask_BT, logp, float("nan"))
    B, T = mask_BT.shape
    return Scores(logp, ent, torch.zeros(B, T, 1, dtype=torch.long), torch.zeros(B, T, 1, dtype=F64))


def _student(batch, seed, scale=1.0):
    B, T = batch.completion_mask_BT.shape
    return (scale * torch.randn(B, T, V, generator=_gen(seed + 3), dtype=F64)).requires_grad_(True)


def _view(logits_BTV, ids_BT):
    logp_BT = torch.log_softmax(logits_BTV, -1).gather(-1, ids_BT[..., None]).squeeze(-1)
    return StudentView(logits_BTV, logp_BT)


def loop_reduce(loss_fn, signal, logits_BTV, ids_BT, micro=2):
    """The loop's reduction (opd.run.loop.update): micro-batches, each token-mean over the
    step's kept count; also the logged metric means."""
    sig = loss_inputs(signal)
    mask_BT = sig["mask_BT"]
    n = mask_BT.sum().clamp(min=1)
    total, sums = 0.0, {}
    for start in range(0, mask_BT.shape[0], micro):
        rows = slice(start, start + micro)
        loss_BT, metrics = loss_fn(_view(logits_BTV[rows], ids_BT[rows]), {k: v[rows] for k, v in sig.items()})
        total = total + masked_token_mean(loss_BT, mask_BT[rows], n)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(torch.where(mask_BT[rows], v.double(), 0.0).sum())
    return total, {k: s / float(n) for k, s in sums.items()}


def naive_returns(r_BT, lengths, gamma):
    """``A_t = Σ_{t ≤ u < len} γ^{u−t} r_u`` row by row, 0 past the row's end (EOS)."""
    out = torch.zeros_like(r_BT)
    for b, n in enumerate(lengths):
        for t in range(n):
            out[b, t] = sum(gamma ** (u - t) * r_BT[b, u] for u in range(t, n))
    return out


def naive_rkl(s_logits, t_logits):
    """``Σ_v p_v (log p_v − log q_v)`` with softmax written out."""
    p = s_logits.exp() / s_logits.exp().sum(-1, keepdim=True)
    q = t_logits.exp() / t_logits.exp().sum(-1, keepdim=True)
    return (p * (p.log() - q.log())).sum(-1)


# --- opd's gamma ---------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.37, 1.0])
def test_opd_gamma_advantages_match_naive(gamma):
    comps = _completions(5, 12, seed=6, eos_rows={0, 1, 3})
    exp = _experience(comps, seed=6)
    scores = _scores(exp.batch.completion_mask_BT, seed=6, garbage=False)
    # garbage after EOS (finite: opd multiplies by the mask) must not enter the returns
    mask = exp.batch.completion_mask_BT
    exp.sampler_logp_BT = torch.where(mask, exp.sampler_logp_BT, 123.0)
    kl_coef = 0.7
    adv = opd_signal(exp, scores, gamma=gamma, kl_coef=kl_coef)["adv_BT"]
    r = -kl_coef * (exp.sampler_logp_BT - scores.token_logp_BT)
    lengths = [c.index(EOS) + 1 if EOS in c else len(c) for c in comps]
    if gamma == 0.0:
        torch.testing.assert_close(adv, torch.where(mask, r, 0.0), **TOL)
    if gamma == 1.0:  # reverse cumulative sum stopping at EOS, by hand
        naive = torch.zeros_like(r)
        for b, n in enumerate(lengths):
            acc = 0.0
            for t in reversed(range(n)):
                acc += float(r[b, t])
                naive[b, t] = acc
        torch.testing.assert_close(adv, naive, **TOL)
    torch.testing.assert_close(adv, naive_returns(r, lengths, gamma), **TOL)


# --- stable_opd ----------------------------------------------------------------------


def naive_term_weights(mask, gold):
    n = int(mask.sum())
    n_roll = sum(int(mask[b].sum()) for b in range(len(gold)) if not gold[b])
    n_gold = n - n_roll
    w_r, w_g = torch.zeros(mask.shape), torch.zeros(mask.shape)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] and gold[b]:
                w_g[b, t] = n / n_gold
            elif mask[b, t]:
                w_r[b, t] = n / n_roll
    return w_r, w_g


@pytest.mark.parametrize("gold", [[0, 0, 1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]])
def test_stable_term_weights_match_naive(gold):
    comps = _completions(5, 8, seed=8)
    mask = make_batch([[1]] * 5, comps, PAD).completion_mask_BT.clone()
    mask[3] = False  # a fully masked row
    gold_B = torch.tensor(gold, dtype=torch.bool)
    w_r, w_g = term_weights_BT(mask, gold_B)
    n_r, n_g = naive_term_weights(mask, gold)
    torch.testing.assert_close(w_r, n_r, rtol=1e-6, atol=0)
    torch.testing.assert_close(w_g, n_g, rtol=1e-6, atol=0)
    assert torch.isfinite(w_r).all() and torch.isfinite(w_g).all()


def _stable_case(seed, logit_scale=1.0):
    """4 rollout rows (2 prompts × 2) + 2 golden rows, with garbage in golden/padding."""
    comps = _completions(6, 10, seed=seed, eos_rows={0, 2, 3, 4, 5})
    exp = _experience(comps, group_size=1, rewards=[0, 1, 0, 0, 1, 1], seed=seed)
    gold_B = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool)
    mask = exp.batch.completion_mask_BT
    ref = torch.randn(*mask.shape, V, generator=_gen(seed + 11), dtype=F64)
    ref[gold_B] = 0.0
    exp.sampler_logp_BT[gold_B] = 0.0
    exp.extra = {"gold_B": gold_B, "ref_logits_BTV": ref}
    scores = _scores(mask, seed)
    logits = _student(exp.batch, seed, scale=logit_scale)
    return exp, scores, logits, gold_B


def naive_stable(exp, scores, logits, gold_B, *, gamma, kl_coef, gold_coef, ref_kl_coef):
    """L_OPD_mean + gold_coef·SFT_mean + ref_kl_coef·KL_mean, term by term."""
    mask, ids = exp.batch.completion_mask_BT, exp.batch.completion_ids_BT
    logp = _view(logits, ids).logp_BT
    lengths = [int(m.sum()) for m in mask]
    r = -kl_coef * (exp.sampler_logp_BT - scores.token_logp_BT)
    r = torch.where(mask, r, 0.0).nan_to_num(0.0)
    adv = naive_returns(r, lengths, gamma)
    opd, sft, kl, n_roll, n_gold = 0.0, 0.0, 0.0, 0, 0
    for b in range(mask.shape[0]):
        for t in range(lengths[b]):
            if gold_B[b]:
                sft, n_gold = sft - logp[b, t], n_gold + 1
            else:
                opd = opd - torch.exp(logp[b, t] - exp.sampler_logp_BT[b, t]) * adv[b, t]
                kl = kl + naive_rkl(logits[b, t], exp.extra["ref_logits_BTV"][b, t])
                n_roll += 1
    return opd / n_roll + gold_coef * sft / n_gold + ref_kl_coef * kl / n_roll, (opd / n_roll, sft / n_gold, kl / n_roll)


@pytest.mark.parametrize("gamma", [0.0, 0.6])
def test_stable_combined_loss_equals_naive_term_means(gamma):
    knobs = dict(gamma=gamma, kl_coef=0.8, gold_coef=0.3, ref_kl_coef=0.05)
    exp, scores, logits, gold_B = _stable_case(9)
    signal = stable_signal(exp, scores, gamma=gamma, kl_coef=0.8, rep_threshold=3.0)
    fn = lambda view, sig: stable_loss(view, sig, opd_loss="is", clip_eps=0.2, gold_coef=0.3, ref_kl_coef=0.05)
    total, metrics = loop_reduce(fn, signal, logits, exp.batch.completion_ids_BT, micro=4)
    (g,) = torch.autograd.grad(total, logits)
    naive, (opd, sft, kl) = naive_stable(exp, scores, logits, gold_B, **knobs)
    (g_naive,) = torch.autograd.grad(naive, logits)
    torch.testing.assert_close(total, naive, **TOL)
    torch.testing.assert_close(g, g_naive, **TOL)
    # the logged metrics are each term's own mean
    assert metrics["loss/pg"] == pytest.approx(float(opd.detach()), rel=1e-6)
    assert metrics["loss/sft"] == pytest.approx(float(sft.detach()), rel=1e-6)
    assert metrics["loss/ref_kl"] == pytest.approx(float(kl.detach()), rel=1e-6)
    assert metrics["loss/total"] == pytest.approx(float(naive.detach()), rel=1e-6)
    assert float(signal["monitor/truncation"]) == pytest.approx(1 / 4)  # row 1 has no EOS


def test_stable_loss_hostile_inputs_stay_finite():
    exp, scores, logits, gold_B = _stable_case(10, logit_scale=1e3)  # very peaked student
    exp.extra["ref_logits_BTV"][0] *= 1e3  # a very peaked reference
    exp.batch.completion_mask_BT[2] = False  # a fully masked rollout row
    signal = stable_signal(exp, scores, gamma=1.0, kl_coef=1.0, rep_threshold=3.0)
    fn = lambda view, sig: stable_loss(view, sig, opd_loss="ppo", clip_eps=0.2, gold_coef=0.1, ref_kl_coef=0.01)
    total, metrics = loop_reduce(fn, signal, logits, exp.batch.completion_ids_BT)
    (g,) = torch.autograd.grad(total, logits)
    assert torch.isfinite(total) and torch.isfinite(g).all()
    assert all(math.isfinite(v) for v in metrics.values())


# --- srpo ----------------------------------------------------------------------------


def test_confidence_weights_match_naive_and_extremes():
    ent = torch.rand(4, 6, generator=_gen(12), dtype=F64) * math.log(V)
    mask = torch.rand(4, 6, generator=_gen(13)) < 0.7
    w = confidence_BT(ent, math.log(V), mask)
    for b in range(4):
        for t in range(6):
            assert float(w[b, t]) == pytest.approx(1 - float(ent[b, t]) / math.log(V) if mask[b, t] else 0.0, rel=1e-12)
    norm = mean_normalize_BT(w, mask)
    mean = sum(float(w[b, t]) for b in range(4) for t in range(6) if mask[b, t]) / int(mask.sum())
    torch.testing.assert_close(norm, torch.where(mask, w / mean, 0.0), **TOL)
    assert float(norm[mask].mean()) == pytest.approx(1.0, rel=1e-12)
    # peaked teacher (H = 0): w = 1; uniform (H = log V): w = 0; rounding above log V clamps
    extreme = confidence_BT(torch.tensor([[0.0, math.log(V), math.log(V) * (1 + 1e-7)]]), torch.tensor([math.log(V)]), torch.ones(1, 3))
    assert extreme.tolist() == [[1.0, 0.0, 0.0]]
    uniform = mean_normalize_BT(torch.zeros(2, 3, dtype=F64), torch.ones(2, 3))
    nothing = mean_normalize_BT(torch.rand(2, 3, dtype=F64), torch.zeros(2, 3))
    assert (uniform == 0).all() and (nothing == 0).all()


def test_srpo_advantages_match_naive():
    comps = _completions(6, 7, seed=14)
    rewards = [1, 0, 0, 1, 1, 1]  # group 0 mixed, group 1 all correct
    exp = _experience(comps, group_size=3, rewards=rewards, seed=14)
    scores = _scores(exp.batch.completion_mask_BT, seed=14)
    mask = exp.batch.completion_mask_BT
    grpo, distill = srpo_advantages_BT(
        exp.rewards_B, 3, exp.sampler_logp_BT, scores.token_logp_BT, mask, kl_coef=0.5, adv_scale="std"
    )
    for b in range(6):
        g = rewards[3 * (b // 3): 3 * (b // 3) + 3]
        mean = sum(g) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / 2)
        a = 0.0 if std == 0 else (rewards[b] - mean) / (std + 1e-6)
        for t in range(mask.shape[1]):
            want_g = a if (mask[b, t] and rewards[b]) else 0.0
            want_d = -0.5 * float(exp.sampler_logp_BT[b, t] - scores.token_logp_BT[b, t]) if (mask[b, t] and not rewards[b]) else 0.0
            assert float(grpo[b, t]) == pytest.approx(want_g, rel=1e-6, abs=1e-9)
            assert float(distill[b, t]) == pytest.approx(want_d, rel=1e-9, abs=1e-12)
    assert torch.isfinite(grpo).all() and torch.isfinite(distill).all()  # garbage never leaks
    assert (grpo[3:] == 0).all()  # all-correct group: no GRPO signal


@pytest.mark.parametrize("weight", ["confidence", "none"])
@pytest.mark.parametrize("opd_loss", ["is", "ppo"])
def test_srpo_loss_equals_naive(weight, opd_loss):
    comps = _completions(6, 9, seed=15)
    rewards = [1, 0, 0, 0, 1, 0]
    exp = _experience(comps, group_size=3, rewards=rewards, seed=15)
    exp.extra["log_vocab_B"] = torch.full((6,), math.log(V))
    scores = _scores(exp.batch.completion_mask_BT, seed=15)
    signal = srpo_signal(exp, scores, weight=weight, kl_coef=1.0, adv_scale="std")
    ids, mask = exp.batch.completion_ids_BT, exp.batch.completion_mask_BT
    # the student moved away from the sampler, so the PPO clip binds somewhere
    logits = _student(exp.batch, 15, scale=2.0)
    fn = lambda view, sig: srpo_loss(view, sig, opd_loss=opd_loss, clip_eps=0.2)
    total, metrics = loop_reduce(fn, signal, logits, ids, micro=4)
    (g,) = torch.autograd.grad(total, logits)

    logp = _view(logits, ids).logp_BT
    T = mask.shape[1]
    failed = [(b, t) for b in range(6) for t in range(T) if mask[b, t] and not rewards[b]]
    conf = {bt: 1 - float(scores.entropy_BT[bt]) / math.log(V) for bt in failed}
    mean_conf = sum(conf.values()) / len(failed)

    naive = 0.0
    for b in range(6):
        grp = rewards[3 * (b // 3): 3 * (b // 3) + 3]
        mu = sum(grp) / 3
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / 2)
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logp[b, t] - exp.sampler_logp_BT[b, t])
            if rewards[b]:
                a = (rewards[b] - mu) / (sd + 1e-6)
                naive = naive + torch.maximum(-ratio * a, -ratio.clamp(0.8, 1.2) * a)
            else:
                a = float(scores.token_logp_BT[b, t] - exp.sampler_logp_BT[b, t])
                w = conf[(b, t)] / mean_conf if weight == "confidence" else 1.0
                term = -ratio * a if opd_loss == "is" else torch.maximum(-ratio * a, -ratio.clamp(0.8, 1.2) * a)
                naive = naive + w * term
    naive = naive / int(mask.sum())
    (g_naive,) = torch.autograd.grad(naive, logits)
    torch.testing.assert_close(total, naive, **TOL)
    torch.testing.assert_close(g, g_naive, **TOL)
    assert metrics["loss/grpo"] + metrics["loss/distill"] == pytest.approx(float(naive.detach()), rel=1e-6)
    ratio = torch.exp(logp - exp.sampler_logp_BT).detach()
    assert (((ratio < 0.8) | (ratio > 1.2)) & mask).any()  # the clip binds on some tokens


# --- gopd ----------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.25, 1.5])
def test_gopd_advantages_match_naive(lam):
    comps = _completions(5, 8, seed=16)
    exp = _experience(comps, seed=16)
    mask = exp.batch.completion_mask_BT
    scores = _scores(mask, seed=16)
    ref = torch.where(mask, -torch.rand(mask.shape, generator=_gen(17), dtype=F64) * 3, float("-inf"))
    adv = gopd_advantages_BT(exp.sampler_logp_BT, scores.token_logp_BT, ref, mask, lam)
    s, t_, r = exp.sampler_logp_BT, scores.token_logp_BT, ref
    for b in range(5):
        for t in range(mask.shape[1]):
            want = lam * (float(t_[b, t]) - float(r[b, t])) - (float(s[b, t]) - float(r[b, t])) if mask[b, t] else 0.0
            assert float(adv[b, t]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert torch.isfinite(adv).all()


def test_gopd_lambda_one_is_exactly_opd():
    comps = _completions(6, 10, seed=18)
    exp = _experience(comps, seed=18, garbage=False)
    scores = _scores(exp.batch.completion_mask_BT, seed=18, garbage=False)
    exp.extra["ref_logp_BT"] = -torch.rand(exp.sampler_logp_BT.shape, generator=_gen(19), dtype=F64) * 5
    gopd = gopd_signal(exp, scores, lam=1.0)
    opd = opd_signal(exp, scores, gamma=0.0, kl_coef=1.0)
    assert torch.equal(gopd["adv_BT"], opd["adv_BT"])
    assert torch.equal(gopd["log_ratio_BT"], opd["log_ratio_BT"])
    assert not torch.equal(gopd_signal(exp, scores, lam=1.25)["adv_BT"], opd["adv_BT"])


# --- rollouts on the tiny testbed ------------------------------------------------------


def test_stable_and_gopd_rollouts_on_the_testbed(tiny_cfg):
    from opd.models.hf import completion_logits
    from opd.run.setup import build_setup

    setup = build_setup(tiny_cfg(method="stable_opd", max_new_tokens=12))
    env, method = setup.env, setup.method
    problems = setup.train_pool[:2]
    exp = method.rollout(env, problems, _gen(0))
    plain = student_rollout(env, problems, _gen(0))
    R, B = 4, 6
    assert exp.batch.input_ids_BL.shape[0] == B and exp.extra["gold_B"].tolist() == [False] * R + [True] * 2
    assert exp.batch.completions()[:R] == plain.batch.completions()
    assert exp.batch.completions()[R:] == [env.encode_solution(p) for p in problems]
    assert exp.batch.prompts() == [env.encode_prompt(p) for p in plain.problems + problems]
    T0 = plain.sampler_logp_BT.shape[1]
    assert torch.equal(exp.sampler_logp_BT[:R, :T0], plain.sampler_logp_BT) and (exp.sampler_logp_BT[R:] == 0).all()
    assert exp.rewards_B[R:].tolist() == [1.0, 1.0]  # golden solutions verify
    # the reference is the frozen initial student: its logits equal the student's at step 0
    mask = exp.batch.completion_mask_BT[:R]
    with torch.no_grad():
        own = completion_logits(env.student, exp.batch.select(torch.arange(R)))
    head = exp.extra["ref_head"]  # a model reference: hidden states and head, never [B, T, V]
    ref_logits = torch.nn.functional.linear(exp.extra["ref_hidden_BTH"], head.weight_VH, head.bias_V)
    torch.testing.assert_close(ref_logits[:R][mask], own[mask], rtol=1e-5, atol=1e-5)
    assert (exp.extra["ref_hidden_BTH"][R:] == 0).all()
    # signal and loss on the real batch: KL to the reference is 0 at the start
    scores = env.teacher.score(exp.batch, topk=8)
    signal = method.signal(exp, scores)
    loss_BT, metrics = method.loss(_view(completion_logits(env.student, exp.batch), exp.batch.completion_ids_BT), loss_inputs(signal))
    m = exp.batch.completion_mask_BT
    assert torch.isfinite(loss_BT[m]).all()
    assert float(metrics["loss/ref_kl"][m].abs().max()) < 1e-5
    # G-OPD's rollout: reference log-probs of the sampled tokens = the sampler's at step 0
    gopd = build_method("gopd", {})
    gexp = gopd.rollout(env, problems, _gen(1))
    gm = gexp.batch.completion_mask_BT
    torch.testing.assert_close(gexp.extra["ref_logp_BT"][gm], gexp.sampler_logp_BT[gm], rtol=1e-4, atol=1e-4)


# --- two-step training runs -----------------------------------------------------------


def _train_and_check(cfg):
    before = AutoModelForCausalLM.from_pretrained(cfg.student).state_dict()
    train(cfg)
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    losses = {k: v for r in rows[1:] for k, v in r.items() if k.startswith("loss/")}
    assert losses and all(v is not None and math.isfinite(v) for v in losses.values())
    after = AutoModelForCausalLM.from_pretrained(f"{cfg.run_dir}/checkpoints/step_000002").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    return rows


SMALL = dict(prompts_per_step=2, max_new_tokens=12, eval_size=2, eval_k=1)


@pytest.mark.parametrize(
    "method, knobs, keys",
    [
        ("stable_opd", {}, ["loss/pg", "loss/sft", "loss/ref_kl", "monitor/truncation", "monitor/repetition"]),
        ("srpo", {}, ["loss/grpo", "loss/distill", "signal/correct_frac", "signal/teacher_conf"]),
        ("gopd", {}, ["loss/pg", "signal/ref_gap"]),
        ("opd", {"gamma": 0.0}, ["loss/pg"]),
        ("opd", {"gamma": 0.5}, ["loss/pg"]),
        ("opd", {"gamma": 1.0}, ["loss/pg"]),
    ],
)
def test_trains_two_steps(method, knobs, keys, tiny_cfg):
    rows = _train_and_check(tiny_cfg(method=method, **SMALL, **knobs))
    for key in keys:
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key


@pytest.mark.parametrize("bad", [{"gold_coef": -0.1}, {"ref_kl_coef": -1.0}, {"rep_threshold": 0.0}, {"gopd_lambda": -1.0}])
def test_config_rejects_out_of_range_knobs(bad):
    from opd.config.train import TrainConfig

    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)
    with pytest.raises(ValueError, match="srpo_weight"):
        build_method("srpo", {"srpo_weight": "entropy"})
