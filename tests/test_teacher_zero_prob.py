"""One rule for zero and undefined teacher log-probs (``opd.signals.teacher_logp``): a ``-inf``
(or NaN) entry is a zero probability, and no method's loss or gradient is NaN or inf on it."""

import dataclasses
import math

import pytest
import torch

from opd.config.train import TrainConfig
from opd.losses import entropy
from opd.methods import METHODS, build_method
from opd.models.base import Scores
from opd.run.loop import pick_problems, step_generator, train_step
from opd.run.setup import build_setup
from opd.signals.teacher_logp import TEACHER_LOGP_FLOOR, floor_logp, floored_logp_V
from opd.testbed.tokenizer import VOCAB

INF = float("inf")


def test_floor_logp_reads_nan_and_minus_inf_as_zero_probability():
    x = torch.tensor([-0.5, -INF, float("nan"), -1e4, INF, -99.0])
    assert floor_logp(x).tolist() == [-0.5, TEACHER_LOGP_FLOOR, TEACHER_LOGP_FLOOR, TEACHER_LOGP_FLOOR, 0.0, -99.0]


def test_floored_logp_keeps_the_distribution_and_drops_nan_entries():
    logits = torch.tensor([[1.0, 2.0, -INF, 0.5], [1.0, float("nan"), 3.0, -INF], [-INF] * 4], dtype=torch.float64)
    got = floored_logp_V(logits)
    assert got.dtype == torch.float64 and torch.equal(got[2], torch.full((4,), -INF, dtype=torch.float64))
    want0 = torch.log_softmax(logits[0], -1).clamp_min(TEACHER_LOGP_FLOOR)
    want1 = torch.log_softmax(torch.tensor([1.0, -INF, 3.0, -INF], dtype=torch.float64), -1).clamp_min(TEACHER_LOGP_FLOOR)
    torch.testing.assert_close(got[0], want0, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], want1, rtol=0, atol=1e-12)
    assert floored_logp_V(torch.zeros(2, 3, dtype=torch.bfloat16)).dtype == torch.float32


class ZeroProbTeacher:
    """Another teacher's scores with zero and undefined probabilities, every field derived
    from the changed logits as a teacher computes them: the ids of ``banned`` have
    probability 0 everywhere (``-inf`` logits, so a sampled banned token has log-prob
    ``-inf``), row 0's first position keeps only two ids (its top-K holds ``-inf``
    log-probs), and one logit of the last row's second position is NaN (that whole position
    is NaN, as ``log_softmax`` makes it)."""

    def __init__(self, inner, banned: list[int]):
        self.inner, self.banned = inner, banned
        self.vocab_size, self.full_logits = inner.vocab_size, True
        self.saw_minus_inf = False

    def score(self, batch, *, topk=8, full=False, temperature=1.0):
        s = self.inner.score(batch, topk=topk, full=True, temperature=temperature)
        logits = s.full_logits_BTV().detach().double().clone()
        logits[..., self.banned] = -INF
        logits[0, 0] = -INF
        logits[0, 0, :2] = torch.tensor([0.0, 1.0], dtype=logits.dtype)
        logits[-1, 1, 5] = float("nan")
        logp = torch.log_softmax(logits, -1)
        ids_BT = batch.completion_ids_BT.to(logits.device)
        token_BT = logp.gather(-1, ids_BT[..., None]).squeeze(-1)
        self.saw_minus_inf |= bool((token_BT[batch.completion_mask_BT.to(logits.device)] == -INF).any())
        top = logp.topk(min(topk, self.vocab_size), dim=-1)
        return Scores(token_BT.float(), entropy(logits).float(), top.indices, top.values.float(), logits.float() if full else None)

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)


TEACHER_METHODS = sorted(n for n in METHODS if build_method(n, {}).teacher_request is not None)


def test_every_method_but_sft_and_grpo_reads_teacher_scores():
    assert set(METHODS) - set(TEACHER_METHODS) == {"sft", "grpo"}


@pytest.mark.parametrize("method", TEACHER_METHODS)
def test_every_method_is_finite_on_zero_and_undefined_teacher_probs(method, tiny_student_dir, tmp_path):
    cfg = TrainConfig(student=tiny_student_dir, teacher="oracle", method=method, steps=30, prompts_per_step=4, group_size=2,
                      micro_batch_size=3, max_new_tokens=30, eval_size=2, eval_k=1, run_dir=str(tmp_path / "r"),
                      progress=False, max_grad_norm=0.0, oracle_noise=0.1)
    setup = build_setup(cfg)
    banned = [VOCAB.index(w) for w in ("3", "7", "+")]
    wrapped = []

    def context(env, exp):
        teacher, batch = setup.method.context(env, exp)
        wrapped.append(ZeroProbTeacher(teacher, banned))
        return wrapped[-1], batch

    method = dataclasses.replace(setup.method, context=context)
    generator = step_generator(0, 0)
    problems = pick_problems(setup.train_pool, cfg.prompts_per_step, generator)
    optimizer = torch.optim.SGD(setup.env.student.parameters(), lr=1e-3)
    metrics, _ = train_step(setup.env, method, problems, generator, optimizer, micro_batch_size=3, max_grad_norm=0.0, ppo_epochs=1)
    assert wrapped and any(t.saw_minus_inf for t in wrapped)  # a sampled token had probability 0
    losses = {k: v for k, v in metrics.items() if k.startswith("loss/")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    assert math.isfinite(metrics["optim/grad_norm"]) and metrics["optim/grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in setup.env.student.parameters())
