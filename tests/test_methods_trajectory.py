"""SKD's interleaved sampler and TRD's refinement (METHODS §15-16), their losses, and
two-step training runs."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from opd.batch import make_batch
from opd.methods.base import Experience, StudentView
from opd.methods.skd import skd_divergence_loss, skd_signal
from opd.methods.trd import refine_context, trd_divergence_loss, trd_signal
from opd.run.metrics_log import read_metrics
from opd.models.hf import HFTeacher
from opd.rollouts.refine import kept_prefix_len, refine_by_prefix, refine_by_prompt, refine_rollout
from opd.models.sampler import pick_tokens, sample
from opd.rollouts.speculative import accepted_prefix_len, in_teacher_topk, speculative_sample
from opd.run.runner import train
from opd.run.setup import build_setup

PAD, EOS, V = 0, 2, 24  # the testbed tokenizer's ids and size
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15, 16], [4, 17, 18], [19]]


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def student():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def teacher_model():
    return tiny_llama(1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def spec(student, teacher, prompts, seed, **kw):
    args = dict(max_new_tokens=20, eos_id=EOS, pad_id=PAD, block=4, topk=3, temperature=1.0, top_p=1.0,
                teacher_temperature=0.2, teacher_top_p=0.5)
    args.update(kw)
    return speculative_sample(student, teacher, prompts, generator=gen(seed), **args)


# ------------------------------------------------------------------ pure helpers
def test_in_teacher_topk_matches_a_rank_count_with_ties():
    g = gen(0)
    logp_BTV = torch.log_softmax(torch.randint(0, 4, (3, 7, 9), generator=g).double(), -1)  # many ties
    tokens_BT = torch.randint(0, 9, (3, 7), generator=g)
    for k in (1, 2, 5, 9):
        topk_BTK = logp_BTV.topk(k, -1).values
        got = in_teacher_topk(logp_BTV.gather(-1, tokens_BT[..., None])[..., 0], topk_BTK)
        for b in range(3):
            for t in range(7):
                row = logp_BTV[b, t].tolist()
                rank = sum(x > row[tokens_BT[b, t]] for x in row)  # strictly more likely tokens
                assert bool(got[b, t]) == (rank < k)


def test_accepted_prefix_len_matches_a_loop():
    g = gen(1)
    accept_BT = torch.rand(50, 8, generator=g) < 0.7
    lengths = torch.randint(0, 9, (50,), generator=g)
    valid_BT = torch.arange(8)[None, :] < lengths[:, None]
    want = []
    for acc, n in zip(accept_BT.tolist(), lengths.tolist()):
        k = 0
        while k < n and acc[k]:
            k += 1
        want.append(k)
    assert accepted_prefix_len(accept_BT, valid_BT).tolist() == want


# ------------------------------------------------------------------ the speculative sampler
def naive_skd(student, teacher_model, prompt, *, max_new_tokens, block, topk, t_temp, t_top_p, seed):
    """One row, token by token: the teacher's next-token logits from a fresh unpadded forward."""
    g, y, written = gen(seed), [], []
    while len(y) < max_new_tokens and not (y and y[-1] == EOS):
        n = min(block, max_new_tokens - len(y))
        proposal = sample(student, [prompt + y], max_new_tokens=n, eos_id=EOS, pad_id=PAD, generator=g)
        for tok in proposal.batch.completions()[0]:
            with torch.no_grad():
                logits_V = teacher_model(torch.tensor([prompt + y])).logits[0, -1].float()
            logp = torch.log_softmax(logits_V, -1).tolist()
            if sum(x > logp[tok] for x in logp) < topk:
                y.append(tok)
                written.append(False)
            else:
                y.append(int(pick_tokens(logits_V[None], t_temp, t_top_p, g)))
                written.append(True)
                break
    return y, written


@pytest.mark.parametrize("topk,t_temp,t_top_p,block", [(1, 0.2, 0.5, 4), (3, 1.0, 1.0, 3), (6, 0.0, 1.0, 5)])
def test_one_row_matches_the_token_by_token_reference(student, teacher_model, topk, t_temp, t_top_p, block):
    teacher = HFTeacher(teacher_model, eos_id=EOS, pad_id=PAD)
    for seed, prompt in enumerate(PROMPTS[:4]):
        out = spec(student, teacher, [prompt], seed, topk=topk, teacher_temperature=t_temp, teacher_top_p=t_top_p,
                   block=block, max_new_tokens=16)
        y, written = naive_skd(student, teacher_model, prompt, max_new_tokens=16, block=block, topk=topk,
                               t_temp=t_temp, t_top_p=t_top_p, seed=seed)
        assert out.batch.completions()[0] == y
        assert out.teacher_written_BT[0, : len(y)].tolist() == written
        assert int(out.proposed_B[0] - out.accepted_B[0]) == sum(written)


def test_student_tokens_are_in_the_teacher_topk_and_teacher_tokens_are_its_argmax(student, teacher_model):
    teacher = HFTeacher(teacher_model, eos_id=EOS, pad_id=PAD)
    out = spec(student, teacher, PROMPTS, 3, topk=3, teacher_temperature=0.0, max_new_tokens=25)
    scores = teacher.score(out.batch, topk=3)
    mask_BT, written_BT = out.batch.completion_mask_BT, out.teacher_written_BT
    in_topk_BT = in_teacher_topk(scores.token_logp_BT, scores.topk_logp_BTK)
    assert in_topk_BT[mask_BT & ~written_BT].all()
    assert (out.batch.completion_ids_BT == scores.topk_ids_BTK[..., 0])[written_BT].all()
    assert written_BT.any() and (mask_BT & ~written_BT).any()
    assert not (written_BT & ~mask_BT).any()
    assert torch.equal(out.proposed_B - out.accepted_B, written_BT.sum(1))
    for c in out.batch.completions():
        assert len(c) <= 25 and (len(c) == 25 or c[-1] == EOS) and EOS not in c[:-1]


def test_topk_of_the_whole_vocabulary_is_plain_student_sampling(student, teacher_model):
    teacher = HFTeacher(teacher_model, eos_id=EOS, pad_id=PAD)
    out = spec(student, teacher, PROMPTS, 5, topk=V, max_new_tokens=30)
    plain = sample(student, PROMPTS, max_new_tokens=30, eos_id=EOS, pad_id=PAD, generator=gen(5))
    assert out.batch.completions() == plain.batch.completions()
    lengths = {len(c) for c in plain.batch.completions()}
    assert len(lengths) > 1  # some rows stopped at EOS before others: finished rows were exercised
    assert not out.teacher_written_BT.any() and torch.equal(out.proposed_B, out.accepted_B)


def test_top1_with_a_greedy_teacher_gives_the_teachers_greedy_output(student, teacher_model):
    teacher = HFTeacher(teacher_model, eos_id=EOS, pad_id=PAD)
    out = spec(student, teacher, PROMPTS[:3], 2, topk=1, teacher_temperature=0.0, max_new_tokens=10)
    greedy = sample(teacher_model, PROMPTS[:3], max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.0)
    assert out.batch.completions() == greedy.batch.completions()


# ------------------------------------------------------------------ the testbed (oracle teacher)
@pytest.fixture
def setup(tiny_cfg):
    def make(**kw):
        return build_setup(tiny_cfg(**{"horizon": 2, "max_new_tokens": 24, **kw}))

    return make


def wrong_draft(s, problem):
    """(index of the wrong word, ids): the reference solution with its answer's first digit changed."""
    words = problem.solution.split()
    i = words.index("ans") + 1
    words[i] = str((int(words[i]) + 1) % 10)
    return i, s.tokenizer(" ".join(words)).input_ids + [s.env.eos_id]


def test_skd_with_the_oracle_at_top1_writes_the_oracles_greedy_solution(setup):
    s = setup(method="skd")
    problems = s.train_pool[:2]
    prompts = [s.env.encode_prompt(p) for p in problems]
    out = speculative_sample(s.env.student, s.env.teacher, prompts, max_new_tokens=24, eos_id=s.env.eos_id,
                             pad_id=s.env.pad_id, block=5, topk=1, teacher_temperature=0.0, generator=gen(0))
    greedy = s.env.teacher.generate(prompts, max_new_tokens=24, temperature=0.0)
    assert out.batch.completions() == greedy
    assert all(s.env.verify(p, c) for p, c in zip(problems, greedy))


def test_refine_prompt_shows_the_draft_and_the_oracle_fixes_it(setup):
    s = setup(method="trd")
    problem = s.train_pool[0]
    _, draft = wrong_draft(s, problem)
    assert not s.env.verify(problem, draft)
    prompt = s.env.encode_refine(problem, draft)
    assert s.tokenizer.decode(prompt, skip_special_tokens=True).endswith(problem.prompt)
    [refined] = refine_by_prompt(s.env, [problem], [draft], temperature=0.0, generator=gen(0))
    assert s.env.verify(problem, refined) and refined[-1] == s.env.eos_id
    assert s.tokenizer.decode(refined, skip_special_tokens=True) == problem.solution


@pytest.mark.parametrize("topk", [1, 2, V])
def test_refine_by_prefix_keeps_the_agreeing_prefix_and_the_oracle_fixes_the_rest(setup, topk):
    s = setup(method="trd", max_new_tokens=64)
    problem = s.train_pool[1]
    wrong_at, draft = wrong_draft(s, problem)
    drafts = make_batch([s.env.encode_prompt(problem)], [draft], s.env.pad_id)
    prefixes, more = refine_by_prefix(s.env, drafts, topk=topk, temperature=0.0, generator=gen(0))
    want_kept = wrong_at if topk == 1 else len(draft) - 1  # oracle, noise 0: K >= 2 keeps every live word
    assert prefixes == [draft[:want_kept]]
    refined = prefixes[0] + more[0]
    assert s.env.verify(problem, refined) and refined[-1] == s.env.eos_id
    if topk > 1:
        assert more[0][0] == s.tokenizer.convert_tokens_to_ids("wait")  # the oracle corrects the kept error


def test_prefix_mode_with_a_model_teacher_continues_greedily(setup, teacher_model):
    s = setup(method="trd", max_new_tokens=12)
    s.env.teacher = HFTeacher(teacher_model, eos_id=s.env.eos_id, pad_id=s.env.pad_id)
    drafts = sample(s.env.student, [s.env.encode_prompt(p) for p in s.train_pool[:4]], max_new_tokens=12,
                    eos_id=s.env.eos_id, pad_id=s.env.pad_id, generator=gen(1)).batch
    kept = kept_prefix_len(s.env.teacher, drafts, topk=8, eos_id=s.env.eos_id).tolist()
    assert any(0 < k < len(d) for k, d in zip(kept, drafts.completions()))  # some draft is partly kept
    prefixes, more = refine_by_prefix(s.env, drafts, topk=8, temperature=0.0, generator=gen(0))
    for prompt, draft, k, pre, m in zip(drafts.prompts(), drafts.completions(), kept, prefixes, more):
        assert pre == draft[:k] and len(pre) + len(m) <= 12
        if len(pre) < 12:
            want = sample(teacher_model, [prompt + pre], max_new_tokens=12 - len(pre), eos_id=s.env.eos_id,
                          pad_id=s.env.pad_id, temperature=0.0).batch.completions()[0]
            assert m == want


def test_hf_teacher_generate_continues_a_prefix(teacher_model):
    teacher = HFTeacher(teacher_model, eos_id=EOS, pad_id=PAD)
    prefixes = [[4, 4], [], [9]]
    got = teacher.generate(PROMPTS[:3], max_new_tokens=6, temperature=0.0, prefix_ids_list=prefixes)
    want = teacher.generate([p + q for p, q in zip(PROMPTS[:3], prefixes)], max_new_tokens=6, temperature=0.0)
    assert got == want


@pytest.mark.parametrize("mode", ["prompt", "prefix"])
def test_refine_rollout_and_its_context_are_column_aligned(setup, mode):
    s = setup(method="trd", trd_refine=mode)
    exp = refine_rollout(s.env, s.train_pool[:2], gen(0), mode=mode, topk=1, temperature=0.0)
    assert exp.batch.input_ids_BL.shape[0] == 2 * s.env.group_size and not exp.on_policy
    assert exp.rewards_B.tolist() == [1.0] * 4  # the oracle (greedy, noise 0) always ends correct
    assert exp.extra["raw_reward_B"].tolist() == [0.0] * 4  # the random student never is
    drafts = [r[m].tolist() for r, m in zip(exp.extra["draft_ids_BT"], exp.extra["draft_mask_BT"])]
    refined = exp.batch.completions()
    if mode == "prompt":
        assert exp.teacher_tokens == sum(len(r) for r in refined)
    else:
        bodies = [len(d) - (d[-1] == s.env.eos_id) for d in drafts]
        kept = [round(float(f) * max(1, n)) for f, n in zip(exp.extra["refine_kept_B"], bodies)]
        assert all(0 <= k <= n and r[:k] == d[:k] for k, n, r, d in zip(kept, bodies, refined, drafts))
        assert exp.teacher_tokens == sum(len(r) - k for r, k in zip(refined, kept))
    teacher, ctx = refine_context(s.env, exp)
    assert torch.equal(ctx.completion_ids_BT, exp.batch.completion_ids_BT)
    assert torch.equal(ctx.completion_mask_BT, exp.batch.completion_mask_BT)
    assert ctx.prompts() == [s.env.encode_refine(p, d) for p, d in zip(exp.problems, drafts)]
    # the oracle reads the problem off the refine prompt's last keyword: same scores as behind x
    a, b = teacher.score(ctx, topk=4, full=True), teacher.score(exp.batch, topk=4, full=True)
    m = exp.batch.completion_mask_BT
    assert torch.allclose(a.logits_BTV[m], b.logits_BTV[m])


# ------------------------------------------------------------------ losses and signals
def naive_divergence(s_V, t_V, kind, beta):
    """Plain per-entry sums over the vocabulary (float64 tensors, differentiable)."""
    ls, lt = torch.log_softmax(s_V, -1), torch.log_softmax(t_V, -1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "fkl":
        return sum(pt[v] * (lt[v] - ls[v]) for v in range(len(s_V)))
    if kind == "rkl":
        return sum(ps[v] * (ls[v] - lt[v]) for v in range(len(s_V)))
    out = 0.0
    for v in range(len(s_V)):
        lm = torch.log(beta * pt[v] + (1 - beta) * ps[v])
        out = out + beta * pt[v] * (lt[v] - lm) + (1 - beta) * ps[v] * (ls[v] - lm)
    return out


@pytest.mark.parametrize("which,kind,beta", [
    ("skd", "fkl", 0.5), ("skd", "rkl", 0.5), ("skd", "jsd", 0.3), ("skd", "jsd", 0.9), ("trd", "fkl", 0.5), ("trd", "rkl", 0.5),
])
def test_losses_match_a_naive_reference_with_gradients(which, kind, beta):
    g = gen(7)
    s_BTV = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t_BTV = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 3
    view, signal = StudentView(s_BTV, torch.zeros(2, 3)), {"teacher_logits_BTV": t_BTV}
    if which == "skd":
        loss_BT, metrics = skd_divergence_loss(view, signal, kind=kind, beta=beta, loss_temperature=1.0)
    else:
        loss_BT, metrics = trd_divergence_loss(view, signal, kind=kind, loss_temperature=1.0)
    assert set(metrics) == {f"loss/{kind}"}
    want_BT = torch.stack([torch.stack([naive_divergence(s_BTV[b, t], t_BTV[b, t], kind, beta) for t in range(3)])
                           for b in range(2)])
    torch.testing.assert_close(loss_BT, want_BT, atol=1e-9, rtol=0)
    w_BT = torch.rand(2, 3, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad((loss_BT * w_BT).sum(), s_BTV)
    (want,) = torch.autograd.grad((want_BT * w_BT).sum(), s_BTV)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_losses_stay_finite_on_extreme_inputs(kind):
    s_BTV = torch.zeros(2, 3, 6, requires_grad=True)
    t_BTV = torch.full((2, 3, 6), -1e4)
    t_BTV[..., 0] = 1e4  # a one-hot teacher
    t_BTV[1, 1] = -math.inf  # no distribution at one position (a masked one): value 0
    s_in = s_BTV.clone()
    s_in[0, 2, 1:] = -math.inf  # a one-hot student where the teacher agrees
    view = StudentView(s_in, torch.zeros(2, 3))
    loss_BT, _ = skd_divergence_loss(view, {"teacher_logits_BTV": t_BTV}, kind=kind, beta=0.5, loss_temperature=1.0)
    assert torch.isfinite(loss_BT).all() and loss_BT[1, 1] == 0 and loss_BT[0, 2].abs() < 1e-4
    (grad,) = torch.autograd.grad(loss_BT.sum(), s_BTV)
    assert torch.isfinite(grad).all()


def test_signals_carry_the_mask_logits_and_rollout_metrics():
    batch = make_batch([[5], [6]], [[7, 8, EOS], [9]], PAD)
    logits = torch.randn(2, 3, V)
    scores = type("S", (), {"logits_BTV": logits})()
    written = torch.tensor([[False, True, False], [True, False, False]])
    exp = Experience(batch, [None, None], torch.arange(2), extra={
        "teacher_written_BT": written, "proposed_B": torch.tensor([3, 1]), "accepted_B": torch.tensor([2, 0])})
    sig = skd_signal(exp, scores)
    assert torch.equal(sig["mask_BT"], batch.completion_mask_BT) and sig["teacher_logits_BTV"] is logits
    assert float(sig["rollout/accept_rate"]) == pytest.approx(2 / 4)
    exp.extra = {"raw_reward_B": torch.tensor([0.0, 1.0]), "refine_kept_B": torch.tensor([0.5, 1.0])}
    sig = trd_signal(exp, scores)
    assert set(sig) == {"mask_BT", "teacher_logits_BTV", "rollout/raw_reward", "rollout/refine_kept"}


# ------------------------------------------------------------------ two training steps
def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("method,knobs,loss_key", [
    ("skd", dict(skd_topk=2, skd_loss="jsd"), "loss/jsd"),
    ("trd", dict(), "loss/fkl"),
    ("trd", dict(trd_refine="prefix", trd_context="plain", trd_loss="rkl", trd_topk=1, refine_temperature=0.5), "loss/rkl"),
])
def test_trains_two_steps(tiny_cfg, method, knobs, loss_key):
    cfg = tiny_cfg(method=method, horizon=2, max_new_tokens=24, prompts_per_step=2, eval_size=2, eval_k=1, **knobs)
    history = train(cfg)
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert math.isfinite(r[loss_key]) and r["optim/grad_norm"] > 0
        if method == "skd":
            assert 0.0 <= r["rollout/accept_rate"] < 1.0 and r["rollout/on_policy"] == 0.0
        else:
            assert r["rollout/raw_reward"] == 0.0 and r["rollout/reward"] == 1.0
            assert ("rollout/refine_kept" in r) == (knobs.get("trd_refine") == "prefix")
    assert history[-1]["usage/teacher_tokens"] > 0
    before, after = _weights(cfg.student), _weights(f"{cfg.run_dir}/checkpoints/step_000002")
    assert any(not torch.equal(before[k], after[k]) for k in before)
