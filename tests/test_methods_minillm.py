"""MiniLLM: teacher-mixed sampler, rewards/returns/whitening, loss, and a 2-step run."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.batch import make_batch
from opd.methods.base import Experience, StudentView
from opd.methods.minillm import minillm_loss, minillm_signal
from opd.run.metrics_log import read_metrics
from opd.models.base import Scores
from opd.models.hf import completion_logits
from opd.rollouts.mixed import mix_logp, mixed_rollout, mixed_sample, teacher_next_logp
from opd.models.sampler import sample
from opd.run.runner import train
from opd.run.setup import build_setup
from opd.signals.minillm import importance_weights, length_normalized_returns, minillm_rewards, whiten
from opd.config.train import TrainConfig

D = torch.float64


def _mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# ----------------------------------------------------------------------------- pure pieces
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.7, 1.0])
def test_mix_logp_matches_the_mixture(alpha):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 7, generator=g, dtype=D)
    t[0, 2] = -math.inf
    t = torch.log_softmax(t, -1)
    s = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=D), -1)
    out = mix_logp(t, s, alpha)
    for i in range(3):
        for v in range(7):
            p = alpha * math.exp(t[i, v]) + (1 - alpha) * math.exp(s[i, v])
            ref = math.log(p) if p > 0 else -math.inf
            assert out[i, v] == ref or abs(float(out[i, v]) - ref) < 1e-12
    assert torch.allclose(out.exp().sum(-1), torch.ones(3, dtype=D))


def test_rewards_scale_clip_and_mask():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(3, 5, generator=g, dtype=D) * 3, torch.randn(3, 5, generator=g, dtype=D) * 3
    t[1, 0] = -math.inf
    mask = _mask([5, 3, 0], 5)
    r = minillm_rewards(t, s, mask, reward_scale=0.5, reward_clip=4.0)
    for b in range(3):
        for i in range(5):
            ref = min(4.0, max(-4.0, (float(t[b, i]) - float(s[b, i])) / 0.5)) if mask[b, i] else 0.0
            assert abs(float(r[b, i]) - ref) < 1e-12
    assert float(r[1, 0]) == -4.0 and torch.isfinite(r).all()


def _naive_returns(r, m, gamma, future):
    B, T = r.shape
    out = torch.zeros(B, T, dtype=D)
    for b in range(B):
        for t in range(T):
            if not m[b, t]:
                continue
            start, shift = (t, 0) if future == "from_t" else (t + 1, 1)
            us = [u for u in range(start, T) if m[b, u]]
            G = sum(gamma ** (u - t - shift) * float(r[b, u]) for u in us)
            out[b, t] = G / len(us) if us else 0.0
    return out


@pytest.mark.parametrize("future", ["from_t", "after_t"])
@pytest.mark.parametrize("gamma", [0.0, 0.95, 1.0])
def test_length_normalized_returns_match_loops(future, gamma):
    g = torch.Generator().manual_seed(2)
    r = torch.randn(4, 9, generator=g, dtype=D)
    mask = _mask([9, 4, 1, 0], 9)
    out = length_normalized_returns(r, mask, gamma, future=future)
    assert torch.allclose(out, _naive_returns(r, mask, gamma, future), atol=1e-10, rtol=0)


def test_length_normalization_divides_by_tokens_to_the_end():
    r = torch.ones(1, 4, dtype=D)
    mask = _mask([4], 4)
    assert length_normalized_returns(r, mask, 1.0).tolist() == [[1.0, 1.0, 1.0, 1.0]]  # (T - t) / (T - t)
    assert length_normalized_returns(r, mask, 1.0, future="after_t").tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_whiten_over_kept_tokens():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, generator=g, dtype=D)
    mask = _mask([6, 2, 0], 6)
    x[2] = 1e30  # garbage where masked must not matter
    kept = [float(x[b, t]) for b in range(3) for t in range(6) if mask[b, t]]
    mean = sum(kept) / len(kept)
    var = sum((k - mean) ** 2 for k in kept) / (len(kept) - 1)
    out = whiten(x, mask)
    for b in range(3):
        for t in range(6):
            ref = (float(x[b, t]) - mean) / math.sqrt(var + 1e-8) if mask[b, t] else 0.0
            assert abs(float(out[b, t]) - ref) < 1e-10
    assert whiten(x, torch.zeros_like(mask)).abs().sum() == 0
    one = whiten(x, _mask([1, 0, 0], 6))
    assert torch.isfinite(one).all() and float(one[0, 0]) == 0.0


def _naive_minillm_loss(logits_s, logits_t, tokens, mix_logp_BT, adv, eps):
    logp_s, logp_t = torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t, -1)
    rkl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    logp = logp_s.gather(-1, tokens[..., None]).squeeze(-1)
    ratio = torch.exp(logp - mix_logp_BT)
    l1, l2 = -ratio * adv, -ratio.clamp(1 - eps, 1 + eps) * adv
    return torch.where(l1 >= l2, l1, l2) + rkl


def test_loss_matches_naive_with_gradients():
    g = torch.Generator().manual_seed(4)
    B, T, V = 2, 5, 11
    logits_t = torch.randn(B, T, V, generator=g, dtype=D) * 2
    tokens = torch.randint(V, (B, T), generator=g)
    mix = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=D), -1).gather(-1, tokens[..., None]).squeeze(-1)
    adv = torch.randn(B, T, generator=g, dtype=D)
    base = torch.randn(B, T, V, generator=g, dtype=D) * 2
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    logp = torch.log_softmax(a, -1).gather(-1, tokens[..., None]).squeeze(-1)
    signal = {"mix_logp_BT": mix, "adv_BT": adv, "teacher_logits_BTV": logits_t}
    loss, metrics = minillm_loss(StudentView(a, logp), signal, clip_eps=0.2)
    ref = _naive_minillm_loss(b, logits_t, tokens, mix, adv, 0.2)
    assert torch.allclose(loss, ref, atol=1e-10, rtol=0)
    loss.sum().backward()
    ref.sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-10, rtol=0)
    assert {"loss/pg", "loss/rkl", "pg/clip_frac"} <= set(metrics)


def test_loss_is_finite_on_extreme_inputs():
    B, T, V = 2, 3, 6
    s = torch.zeros(B, T, V, dtype=D)
    s[..., 0] = 1e4  # very peaked student
    t = torch.full((B, T, V), -math.inf, dtype=D)
    t[..., 0] = 0.0  # teacher: all mass on token 0, -inf elsewhere
    s = s.requires_grad_()
    tokens = torch.zeros(B, T, dtype=torch.long)
    logp = torch.log_softmax(s, -1).gather(-1, tokens[..., None]).squeeze(-1)
    signal = {"mix_logp_BT": torch.zeros(B, T, dtype=D), "adv_BT": torch.zeros(B, T, dtype=D), "teacher_logits_BTV": t}
    loss, _ = minillm_loss(StudentView(s, logp), signal, clip_eps=0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    mask = torch.zeros(B, T, dtype=torch.bool)  # fully masked rows: zero signal
    r = minillm_rewards(torch.full((B, T), -math.inf), torch.zeros(B, T), mask, reward_scale=0.5, reward_clip=100.0)
    assert r.abs().sum() == 0 and length_normalized_returns(r, mask, 0.95).abs().sum() == 0


def test_signal_composes_rewards_returns_and_whitening():
    g = torch.Generator().manual_seed(6)
    B, T, V = 3, 6, 5
    batch = make_batch([[4, 5]] * B, [[7] * n for n in (6, 4, 2)], 0)
    mask = batch.completion_mask_BT
    student = torch.where(mask, -torch.rand(B, T, generator=g, dtype=D), 0.0)
    mix = torch.where(mask, -torch.rand(B, T, generator=g, dtype=D), 0.0)
    teacher = -torch.rand(B, T, generator=g, dtype=D) * 4
    logits = torch.randn(B, T, V, generator=g)
    exp = Experience(batch, [None] * B, torch.arange(B), sampler_logp_BT=student, extra={"mix_logp_BT": mix})
    scores = Scores(teacher, torch.zeros(B, T), torch.zeros(B, T, 1, dtype=torch.long), torch.zeros(B, T, 1), logits)
    for whiten_adv, future in ((True, "from_t"), (False, "after_t")):
        sig = minillm_signal(exp, scores, gamma=0.9, reward_scale=0.5, reward_clip=3.0, whiten_adv=whiten_adv, future=future)
        r = torch.where(mask, ((teacher - student) / 0.5).clamp(-3.0, 3.0), 0.0)
        ref = _naive_returns(r, mask, 0.9, future)
        if whiten_adv:
            kept = ref[mask]
            ref = torch.where(mask, (ref - kept.mean()) / torch.sqrt(kept.var() + 1e-8), 0.0)
        assert torch.allclose(sig["adv_BT"], ref, atol=1e-10, rtol=0)
        assert torch.allclose(sig["signal/w"], torch.where(mask, (student - mix).exp(), 0.0))
        assert sig["mix_logp_BT"] is mix and sig["teacher_logits_BTV"] is logits


def test_importance_weights():
    s, m = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.4]]))
    w = importance_weights(s, m, torch.tensor([[True, False]]))
    assert torch.allclose(w, torch.tensor([[2.0, 0.0]]))


# ----------------------------------------------------------------------------- the sampler
@pytest.fixture(scope="module")
def setup(tiny_student_dir, tmp_path_factory):
    cfg = TrainConfig(student=tiny_student_dir, teacher="oracle", method="minillm", max_new_tokens=40, group_size=2,
                      run_dir=str(tmp_path_factory.mktemp("unused")))
    return build_setup(cfg)


def _prompts(setup, n):
    return [setup.env.encode_prompt(p) for p in setup.train_pool[:n]]


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_mixed_logprobs_equal_fresh_forwards(setup, temperature):
    """The recorded log-probs are the untempered ones, whatever the sampling temperature."""
    env, prompts = setup.env, _prompts(setup, 4)
    out = mixed_sample(env.student, env.teacher, prompts, alpha=0.3, max_new_tokens=12, eos_id=env.eos_id,
                       pad_id=env.pad_id, temperature=temperature, generator=torch.Generator().manual_seed(0))
    mask, ids = out.batch.completion_mask_BT, out.batch.completion_ids_BT[..., None]
    with torch.no_grad():
        s = torch.log_softmax(completion_logits(env.student, out.batch), -1).gather(-1, ids).squeeze(-1)
    t = env.teacher.score(out.batch).token_logp_BT
    ref = torch.log(0.3 * t.double().exp() + 0.7 * s.double().exp())
    assert torch.allclose(out.student_logp_BT[mask], s[mask], atol=1e-5)
    assert torch.allclose(out.mix_logp_BT[mask].double(), ref[mask], atol=1e-5)
    assert (out.mix_logp_BT[~mask] == 0).all() and (out.student_logp_BT[~mask] == 0).all()
    assert out.teacher_queries == int(mask.sum())


def test_alpha_zero_is_the_student_sampler(setup):
    env, prompts = setup.env, _prompts(setup, 4)
    kw = dict(max_new_tokens=12, eos_id=env.eos_id, pad_id=env.pad_id, temperature=1.0)
    mixed = mixed_sample(env.student, None, prompts, alpha=0.0, generator=torch.Generator().manual_seed(5), **kw)
    plain = sample(env.student, prompts, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(mixed.batch.input_ids_BL, plain.batch.input_ids_BL)
    assert torch.allclose(mixed.student_logp_BT, plain.sampler_logp_BT)
    assert torch.equal(mixed.mix_logp_BT, mixed.student_logp_BT) and mixed.teacher_queries == 0


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_first_tokens_follow_the_mixture(setup, temperature):
    """Tokens are drawn from alpha·softmax(z_T/tau) + (1 - alpha)·softmax(z_S/tau)."""
    env, N, alpha = setup.env, 2000, 0.5
    prompt = _prompts(setup, 1)[0]
    out = mixed_sample(env.student, env.teacher, [prompt] * N, alpha=alpha, max_new_tokens=1, eos_id=env.eos_id,
                       pad_id=env.pad_id, temperature=temperature, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z_s = completion_logits(env.student, make_batch([prompt], [[]], env.pad_id))[0, 0].double()
    z_t = teacher_next_logp(env.teacher, [prompt], [[]], env.pad_id)[0].double()
    p = alpha * torch.softmax(z_t / temperature, -1) + (1 - alpha) * torch.softmax(z_s / temperature, -1)
    freq = torch.bincount(out.batch.completion_ids_BT[:, 0], minlength=p.numel()).double() / N
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-3), (freq, p)
    assert (freq - torch.softmax(z_s / temperature, -1)).abs().max() > 0.1  # the teacher does shift the draws


def test_alpha_one_follows_the_teacher(setup):
    env = setup.env
    exp = mixed_rollout(env, setup.train_pool[:4], torch.Generator().manual_seed(2), alpha=1.0)
    t = env.teacher.score(exp.batch).token_logp_BT
    mask = exp.batch.completion_mask_BT
    assert torch.allclose(exp.extra["mix_logp_BT"][mask], t[mask], atol=1e-5)
    assert exp.on_policy is False and exp.teacher_tokens == int(mask.sum())
    assert float(exp.rewards_B.mean()) > 0.5  # a sharp oracle mostly solves the (short) problems


# ----------------------------------------------------------------------------- end to end
def test_minillm_trains_two_steps(tiny_cfg):
    cfg = tiny_cfg(method="minillm", prompts_per_step=2, max_new_tokens=12, eval_size=2, eval_k=1)
    before = AutoModelForCausalLM.from_pretrained(cfg.student).state_dict()
    train(cfg)
    rows = read_metrics(cfg.run_dir)
    for row in rows[1:]:
        assert all(math.isfinite(row[k]) for k in ("loss/pg", "loss/rkl", "signal/w", "optim/grad_norm"))
        assert row["rollout/on_policy"] == 0.0 and row["loss/rkl"] > 0
    assert rows[-1]["usage/teacher_tokens"] > 0
    after = AutoModelForCausalLM.from_pretrained(f"{cfg.run_dir}/checkpoints/step_000002").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
