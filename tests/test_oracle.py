import math
import time

import pytest
import torch

from opd.batch import make_batch
from opd.testbed import addition
from opd.testbed.oracle import DEAD_LOGIT, OracleTeacher
from opd.testbed.tasks import make_task
from opd.testbed.tokenizer import DIGITS, build_tokenizer

TOK = build_tokenizer()
V = len(TOK)
DEAD = {TOK.pad_token_id, TOK.bos_token_id, TOK.unk_token_id}
LIVE = [v for v in range(V) if v not in DEAD]
# solution: 2 5 0 = 0 7 ; 7 1 0 = 0 8 ; 4 9 0 = 1 3 ; 5 8 1 = 1 4 ; ans 7 8 3 4 1
ADD = "add 2 7 4 5 + 5 1 9 8 ="
MOD = "mod 7 start 3 + 4 * 2 - 5 * 3 ="
MOD_SOLUTION = "3 + 4 = 0 ; 0 * 2 = 0 ; 0 - 5 = 2 ; 2 * 3 = 6 ; ans 6"


def ids(text):
    return TOK(text).input_ids if text else []


def tid(word):
    return TOK.convert_tokens_to_ids(word)


def expected_probs(intended, plausible, eps, s):
    """The documented formula, written out naively in float64."""
    intended = tid(intended)
    W = [tid(w) for w in plausible] or [v for v in LIVE if v != intended]
    z = math.exp(s) + (len(LIVE) - 1) + len(DEAD) * math.exp(DEAD_LOGIT)
    p = []
    for v in range(V):
        q = math.exp(s) / z if v == intended else math.exp(DEAD_LOGIT) / z if v in DEAD else 1 / z
        p.append((1 - eps) * q + (eps / len(W) if v in W else 0.0))
    return torch.tensor(p, dtype=torch.float64)


def probs(oracle, prompt, prefix):
    return oracle.next_logprobs(ids(prompt), ids(prefix)).double().exp()


def assert_dist(p, intended, plausible, eps, s):
    want = expected_probs(intended, plausible, eps, s)
    torch.testing.assert_close(p, want, atol=1e-6, rtol=0)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def others(d):
    return [w for w in DIGITS if w != d]


# ------------------------------------------------------------- intended tokens, exact values
@pytest.mark.parametrize("s", [0.0, 2.0, 10.0])
def test_correct_prefix_favours_the_reference_token(s):
    o = OracleTeacher(tokenizer=TOK, sharpness=s)
    cases = [("", "2"), ("2 5 0 =", "0"), ("2 5 0 = 0 7", ";"), ("2 5 0 = 0 7 ; 7 1", "0")]
    for prefix, want in cases:
        assert_dist(probs(o, ADD, prefix), want, [], 0.0, s)
    full = "2 5 0 = 0 7 ; 7 1 0 = 0 8 ; 4 9 0 = 1 3 ; 5 8 1 = 1 4 ; ans 7 8 3 4 1"
    assert_dist(probs(o, ADD, full), "<eos>", [], 0.0, s)
    assert probs(o, ADD, full + " <eos>").argmax() == TOK.eos_token_id
    assert_dist(probs(o, MOD, "3 + 4 = 0 ; 0 *"), "2", [], 0.0, s)


def test_sharpness_is_the_logit_gap():
    for s in (0.0, 1.0, 5.0, 10.0):
        lp = OracleTeacher(tokenizer=TOK, sharpness=s).next_logprobs(ids(ADD), ids("2 5 0 = 0"))
        gaps = lp[tid("7")] - lp[LIVE]
        assert sorted(gaps.tolist())[1] == pytest.approx(s, abs=1e-5)  # [0] is 7 itself
    p_hi = probs(OracleTeacher(tokenizer=TOK, sharpness=10), ADD, "").max()
    p_lo = probs(OracleTeacher(tokenizer=TOK, sharpness=3), ADD, "").max()
    assert p_hi > p_lo
    uniform = probs(OracleTeacher(tokenizer=TOK, sharpness=0), ADD, "")
    close(uniform[LIVE], torch.full((len(LIVE),), 1 / len(LIVE), dtype=torch.float64), atol=1e-6)


def test_wrong_step_recovering_teacher_says_wait_then_redoes_the_step():
    o = OracleTeacher(tokenizer=TOK, sharpness=8.0, noise=0.2)
    # first wrong token (8 instead of 7): wait; its noise goes to the continuation ";"
    assert_dist(probs(o, ADD, "2 5 0 = 0 8"), "wait", [";"], 0.2, 8.0)
    # still wrong two steps later: wait, noise on what would continue the wrong prefix
    assert_dist(probs(o, ADD, "2 5 0 = 0 8 ; 7 1"), "wait", ["0"], 0.2, 8.0)
    # after wait: the redone step's first token, then the step in full
    assert_dist(probs(o, ADD, "2 5 0 = 0 8 wait"), "2", others("2"), 0.2, 8.0)
    p = probs(o, ADD, "2 5 0 = 0 8 ; 7 1 0 = 0 8 ; wait")
    assert_dist(p, "2", others("2"), 0.2, 8.0)
    assert_dist(probs(o, ADD, "2 5 0 = 0 8 wait 2 5 0 = 0"), "7", others("7"), 0.2, 8.0)
    # a wrong copied operand, and modchain
    assert probs(o, ADD, "3").argmax() == tid("wait")
    assert probs(o, MOD, "3 + 4 = 1").argmax() == tid("wait")
    assert probs(o, MOD, "3 + 4 = 1 wait").argmax() == tid("3")


def test_wrong_step_continuing_teacher_goes_on_as_if_right():
    o = OracleTeacher(tokenizer=TOK, sharpness=8.0, recovers=False)
    assert probs(o, ADD, "2 5 0 = 0 8").argmax() == tid(";")
    assert_dist(probs(o, ADD, "2 5 0 = 1 7 ; 7 1"), "1", [], 0.0, 8.0)
    assert probs(o, ADD, "2 5 0 = 1 7 ; 7 1 1 =").argmax() == tid("0")
    assert probs(o, ADD, "2 5 0 = 1 7 ; 7 1 1 = 0").argmax() == tid("9")  # 7 + 1 + 1
    assert probs(o, MOD, "3 + 4 = 1 ;").argmax() == tid("1")  # copies the wrong value
    assert probs(o, MOD, "3 + 4 = 1 ; 1 * 2 =").argmax() == tid("2")
    # a spontaneous wait still restarts the step
    assert probs(o, ADD, "2 5 0 = 0 8 wait").argmax() == tid("2")


def test_noise_mass_on_plausible_wrong_tokens():
    s, eps = 6.0, 0.3
    o = OracleTeacher(tokenizer=TOK, sharpness=s, noise=eps)
    z = math.exp(s) + (len(LIVE) - 1) + len(DEAD) * math.exp(DEAD_LOGIT)
    p = probs(o, ADD, "2 5 0 = 0")  # digit slot: W = the other nine digits
    W = [tid(w) for w in others("7")]
    assert p[W].sum().item() == pytest.approx(eps + (1 - eps) * 9 / z, abs=1e-6)
    assert p[tid("7")].item() == pytest.approx((1 - eps) * math.exp(s) / z, abs=1e-6)
    assert_dist(p, "7", others("7"), eps, s)
    p = probs(o, ADD, "2 5 0 = 0 7 ; 7 1")  # carry slot: W = the other carry
    assert_dist(p, "0", ["1"], eps, s)
    p = probs(o, ADD, "2 5 0")  # "=" slot: no plausible alternative, spread on all live
    assert_dist(p, "=", [], eps, s)
    p = probs(o, MOD, "3")  # operator slot
    assert_dist(p, "+", ["-", "*"], eps, s)
    p = probs(o, MOD, "3 + 4 =")  # value slot mod 7: the other values 0..6
    assert_dist(p, "0", list("123456"), eps, s)


def test_decay_with_deviations():
    s, noise, decay = 6.0, 0.1, 0.25
    o = OracleTeacher(tokenizer=TOK, sharpness=s, noise=noise, decay=decay, decay_mode="deviations")
    clean = probs(o, ADD, "2 5 0 = 0 7 ; 7 1")
    once = probs(o, ADD, "2 5 0 = 0 8 wait 2 5 0 = 0 7 ; 7 1")  # one deviation, corrected
    twice = probs(o, ADD, "2 5 0 = 0 8 ; wait 2 5 0 = 0 7 ; 7 1")  # "8", then ";" for wait
    for p, n in [(clean, 0), (once, 1), (twice, 2)]:
        eps = 1 - (1 - noise) * (1 - decay) ** n
        assert_dist(p, "0", ["1"], eps, s)
    assert clean[tid("0")] > once[tid("0")] > twice[tid("0")]
    trace = o.trace(ids(ADD), ids("2 5 0 = 0 8 ; 7 wait 2"))
    assert [t.deviations for t in trace] == [0, 0, 0, 0, 0, 0, 1, 2, 3, 3]


def test_decay_with_position():
    s, noise, decay = 6.0, 0.05, 0.02
    o = OracleTeacher(tokenizer=TOK, sharpness=s, noise=noise, decay=decay, decay_mode="position")
    sol = "2 5 0 = 0 7 ; 7 1 0 = 0 8 ; 4 9 0 = 1 3".split()
    slots = {0: others("2"), 3: [], 4: ["1"], 6: [], 11: ["1"], 12: others("8"), 16: ["1"]}
    for t, plausible in slots.items():
        eps = 1 - (1 - noise) * (1 - decay) ** t
        assert_dist(probs(o, ADD, " ".join(sol[:t])), sol[t], plausible, eps, s)


class _OtherTokenizer:
    def get_vocab(self):
        return {"<eos>": 0, "hello": 1}

    def __len__(self):
        return 2


def test_knob_validation():
    with pytest.raises(ValueError):
        OracleTeacher(tokenizer=TOK, noise=1.0)
    with pytest.raises(ValueError):
        OracleTeacher(tokenizer=TOK, decay=-0.1)
    with pytest.raises(ValueError):
        OracleTeacher(tokenizer=TOK, decay_mode="time")
    assert OracleTeacher(tokenizer=TOK).vocab_size == V
    assert OracleTeacher(make_task("modchain", 3), TOK, noise=0.1).noise == 0.1  # setup.py's call
    with pytest.raises(ValueError):
        OracleTeacher(tokenizer=_OtherTokenizer())
    with pytest.raises(ValueError):
        OracleTeacher(object(), TOK)


# ------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["addition", "modchain", "modchain_labeled"])
def test_greedy_reproduces_the_reference(name):
    for h in (1, 3, 4, 6, 8):
        task = make_task(name, h)
        tok = build_tokenizer(getattr(task, "words", ()))
        o = OracleTeacher(tokenizer=tok, noise=0.3, decay=0.1)  # greedy ignores noise on a clean path
        ps = task.problems("test", 40, seed=h)
        outs = o.generate([tok(p.prompt).input_ids for p in ps], max_new_tokens=100, temperature=0.0)
        for p, out in zip(ps, outs):
            assert out[-1] == tok.eos_token_id
            assert tok.decode(out[:-1]) == p.solution
            assert task.verify(p, tok.decode(out))


def test_sampling_recovers_from_its_own_errors():
    task = make_task("addition", 6)
    ps = task.problems("train", 64, seed=0)
    prompts = [ids(p.prompt) for p in ps]
    g = torch.Generator().manual_seed(0)
    recovering = OracleTeacher(tokenizer=TOK, noise=0.05)
    outs = recovering.generate(prompts, max_new_tokens=200, generator=g)
    texts = [TOK.decode(o) for o in outs]
    assert sum("wait" in t.split() for t in texts) >= 40  # it made and fixed mistakes
    assert sum(task.verify(p, t) for p, t in zip(ps, texts)) >= 60
    g = torch.Generator().manual_seed(0)
    continuing = OracleTeacher(tokenizer=TOK, noise=0.05, recovers=False)
    outs = continuing.generate(prompts, max_new_tokens=200, generator=g)
    assert sum(task.verify(p, TOK.decode(o)) for p, o in zip(ps, outs)) < 25


def test_generate_seeded_top_p_and_prefix():
    o = OracleTeacher(tokenizer=TOK, sharpness=2.0)
    prompts = [ids(ADD), ids(MOD)]
    a = o.generate(prompts, max_new_tokens=30, generator=torch.Generator().manual_seed(3))
    b = o.generate(prompts, max_new_tokens=30, generator=torch.Generator().manual_seed(3))
    assert a == b and all(len(x) <= 30 for x in a)
    for x in a:
        assert TOK.eos_token_id not in x[:-1]
    greedy = o.generate(prompts, max_new_tokens=60, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    nucleus = o.generate(prompts, max_new_tokens=60, top_p=0.05, generator=g)
    assert nucleus == greedy
    # continue a planted wrong prefix: the recovering teacher fixes it, the other does not
    planted = [ids("2 5 0 = 0 8"), ids("3 + 4 = 1")]
    fixed = o.generate(prompts, max_new_tokens=60, temperature=0.0, prefix_ids_list=planted)
    assert TOK.decode(fixed[0]).startswith("wait 2 5 0 = 0 7 ;")
    assert TOK.decode(fixed[1]) == "wait " + MOD_SOLUTION + " <eos>"
    cont = OracleTeacher(tokenizer=TOK, recovers=False).generate(
        prompts, max_new_tokens=60, temperature=0.0, prefix_ids_list=planted
    )
    assert TOK.decode(cont[1]) == "; 1 * 2 = 2 ; 2 - 5 = 4 ; 4 * 3 = 5 ; ans 5 <eos>"
    assert o.generate(prompts[:1], max_new_tokens=5, prefix_ids_list=[ids("ans 3 <eos>")]) == [[]]


# ------------------------------------------------------------- the Teacher protocol
def _batch(noise=0.1):
    task = make_task("modchain", 5)
    ps = make_task("addition", 4).problems("train", 8, 0) + task.problems("train", 8, 0)
    prompts = [ids(p.prompt) for p in ps]
    sampler = OracleTeacher(tokenizer=TOK, sharpness=3.0, noise=noise)
    comps = sampler.generate(prompts, max_new_tokens=50, generator=torch.Generator().manual_seed(1))
    return prompts, comps, make_batch(prompts, comps, TOK.pad_token_id)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_consistent_with_next_logprobs_and_logits(temperature):
    prompts, comps, batch = _batch()
    o = OracleTeacher(tokenizer=TOK, sharpness=5.0, noise=0.2, decay=0.1)
    sc = o.score(batch, topk=5, full=True, temperature=temperature)
    B, T = batch.completion_mask_BT.shape
    assert sc.logits_BTV.shape == (B, T, V) and sc.topk_ids_BTK.shape == (B, T, 5)
    logq = torch.log_softmax(sc.logits_BTV.double(), -1)
    y = batch.completion_ids_BT
    close(logq.gather(-1, y[..., None]).squeeze(-1), sc.token_logp_BT.double())
    close(-(logq.exp() * logq).sum(-1), sc.entropy_BT.double())
    assert (sc.topk_logp_BTK[..., :-1] >= sc.topk_logp_BTK[..., 1:]).all()
    close(logq.gather(-1, sc.topk_ids_BTK), sc.topk_logp_BTK.double())
    close(logq.topk(5, -1).values, sc.topk_logp_BTK.double())
    for b in range(0, B, 3):
        for t in range(len(comps[b])):
            want = o.next_logprobs(prompts[b], comps[b][:t], temperature=temperature)
            got = sc.logits_BTV[b, t].log_softmax(-1)
            torch.testing.assert_close(got.exp(), want.exp(), atol=1e-6, rtol=0)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
            got_token = sc.token_logp_BT[b, t].item()
            assert got_token == pytest.approx(want[comps[b][t]].item(), abs=1e-5)
    assert o.score(batch, topk=5).logits_BTV is None


def test_malformed_prefixes_give_finite_normalized_distributions():
    g = torch.Generator().manual_seed(0)
    prompts = [ids(ADD), ids(MOD), ids("add 1 2 ="), ids("= ; wait")]
    prompts += [[TOK.pad_token_id], [TOK.unk_token_id, 5]]
    prompts += [torch.randint(0, V, (9,), generator=g).tolist() for _ in range(4)]
    comps = [torch.randint(0, V, (40,), generator=g).tolist() for _ in prompts]
    for recovers in (True, False):
        for mode in ("deviations", "position"):
            knobs = dict(noise=0.5, decay=0.5, decay_mode=mode, recovers=recovers)
            o = OracleTeacher(tokenizer=TOK, **knobs)
            sc = o.score(make_batch(prompts, comps, TOK.pad_token_id), topk=4, full=True)
            for x in (sc.token_logp_BT, sc.entropy_BT, sc.topk_logp_BTK, sc.logits_BTV):
                assert torch.isfinite(x).all()
            close(sc.logits_BTV.logsumexp(-1), torch.zeros(sc.logits_BTV.shape[:2]))
            assert (sc.entropy_BT >= 0).all()
    o = OracleTeacher(tokenizer=TOK)
    assert probs(o, "foo bar", "3 +").argmax() == TOK.eos_token_id  # unparseable prompt
    assert probs(o, ADD, "= = ;").argmax() == tid("wait")
    assert probs(OracleTeacher(tokenizer=TOK, recovers=False), ADD, "= =").argmax() == tid("wait")
    assert probs(o, ADD, "= = ; wait").argmax() == tid("2")


def test_score_is_fast():
    task = make_task("addition", 7)
    ps = task.problems("train", 64, 0)
    prompts = [ids(p.prompt) for p in ps]
    g = torch.Generator().manual_seed(0)
    sampler = OracleTeacher(tokenizer=TOK, noise=0.1)
    comps = sampler.generate(prompts, max_new_tokens=60, generator=g)
    batch = make_batch(prompts, comps, TOK.pad_token_id)
    assert batch.completion_mask_BT.shape[1] >= 55
    o = OracleTeacher(tokenizer=TOK, noise=0.1, decay=0.1)
    start = time.perf_counter()
    o.score(batch, topk=8, full=True)
    assert time.perf_counter() - start < 1.0


def test_a_blind_spot_oracle_fails_exactly_on_long_carry_chains():
    from opd.testbed.addition import in_blind_spot
    from opd.testbed.tasks import make_task
    from opd.testbed.tokenizer import build_tokenizer

    task, tok = make_task("addition", 4), build_tokenizer()
    oracle = OracleTeacher(task, tok, blind_spot=3)
    problems = task.problems("test", 300, 0)
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    done = oracle.generate(prompts, max_new_tokens=64, temperature=0.0)
    right = [task.verify(p, tok.decode(c)) for p, c in zip(problems, done)]
    blind = [in_blind_spot(p, 3) for p in problems]
    assert 0.1 < sum(blind) / len(blind) < 0.35  # about a fifth of horizon-4 problems
    assert not any(r for r, b in zip(right, blind) if b) and all(r for r, b in zip(right, blind) if not b)
    assert set(oracle.eval_subsets) == {"blind_spot", "rest"}
    plain = OracleTeacher(task, tok)
    assert plain.eval_subsets == {} and all(task.verify(p, tok.decode(c)) for p, c in
                                            zip(problems, plain.generate(prompts, max_new_tokens=64, temperature=0.0)))


def test_the_run_reports_the_blind_spot_apart(tiny_cfg):
    from opd.run.runner import train
    from opd.run.evaluate import subset_accuracy

    assert subset_accuracy([1, 2, 3], [True, False, True], {"odd": lambda p: p % 2 == 1, "none": lambda p: False}) == \
        {"eval/accuracy_odd": 1.0}
    row = train(tiny_cfg(oracle_blind_spot=3, steps=1, eval_size=40))[-1]
    assert {"eval/accuracy_blind_spot", "eval/accuracy_rest"} <= set(row)


def test_recover_prob_mixes_the_recovering_and_continuing_oracles():
    """p_r = r p_rec + (1 - r) p_cont at every position (each walking the prefix), scoring
    and next_logprobs agree, and sampling follows the mixture."""
    from opd.testbed.tasks import make_task

    tok = build_tokenizer()
    kw = dict(tokenizer=tok, noise=0.2)
    rec, cont, mix = OracleTeacher(**kw), OracleTeacher(recovers=False, **kw), OracleTeacher(recover_prob=0.3, **kw)
    problem = make_task("addition", 4).problems("test", 1, seed=0)[0]
    prompt = tok(problem.prompt, add_special_tokens=False)["input_ids"]
    sol = tok(problem.solution, add_special_tokens=False)["input_ids"]
    wrong = list(sol)
    wrong[4] = (wrong[4] + 1 - 4) % 10 + 4  # a wrong digit (ids 4..13 are the digits)
    for t in range(len(wrong) + 1):
        want = torch.logsumexp(torch.stack([math.log(0.3) + rec.next_logprobs(prompt, wrong[:t]).double(),
                                            math.log(0.7) + cont.next_logprobs(prompt, wrong[:t]).double()]), 0)
        assert torch.allclose(mix.next_logprobs(prompt, wrong[:t]).double(), want, atol=1e-5)
    p_wait = mix.next_logprobs(prompt, wrong[:5])[tok.convert_tokens_to_ids("wait")].exp()
    assert 0.3 * 0.8 * 0.99 < p_wait < 0.3 * 0.8  # the recovering part's intended word (q_i < 1), times 1 - noise
    batch = make_batch([prompt], [wrong], tok.pad_token_id)
    scored = mix.score(batch).token_logp_BT[0]
    assert torch.allclose(scored, torch.stack([mix.next_logprobs(prompt, wrong[:t])[w] for t, w in enumerate(wrong)]), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    firsts = [c[0] for c in mix.generate([prompt] * 400, max_new_tokens=1, temperature=1.0, generator=g, prefix_ids_list=[wrong[:5]] * 400)]
    share = sum(f == tok.convert_tokens_to_ids("wait") for f in firsts) / 400
    assert abs(share - float(p_wait)) < 0.07  # 400 draws: sd ~0.02
    with pytest.raises(ValueError, match="recover_prob"):
        OracleTeacher(recovers=False, recover_prob=0.5, tokenizer=tok)


def test_off_by_one_noise_puts_the_noise_on_the_next_digit():
    tok = build_tokenizer()
    oracle = OracleTeacher(tokenizer=tok, noise=0.3, noise_kind="off_by_one")
    from opd.testbed.tasks import make_task

    problem = make_task("addition", 4).problems("test", 1, seed=1)[0]
    prompt = tok(problem.prompt, add_special_tokens=False)["input_ids"]
    sol = tok(problem.solution, add_special_tokens=False)["input_ids"]
    digits, checked = set(range(4, 14)), 0
    for t, (want, target) in enumerate(zip(sol, oracle.trace(prompt, sol))):
        probs = oracle.next_logprobs(prompt, sol[:t]).exp()
        if want in digits:  # W: the other digits at a digit slot, the other carry at a carry slot
            nxt = min([w for w in target.plausible if w > want] or target.plausible)
            assert nxt == ((want - 4 + 1) % 10 + 4 if len(target.plausible) == 9 else target.plausible[0])
            assert probs[nxt] == pytest.approx(0.3, abs=2e-3)  # all of the noise on the next digit of W
            assert float(probs[[d for d in digits if d not in (want, nxt)]].sum()) < 1e-3
            checked += 1
    assert checked == 4 * 5 + 5  # five digits per step (a b carry = carry unit), five in the answer
    assert oracle._spread_words("6", ("0", "1", "2", "3", "4", "5")) == ("0",)  # cyclic within W (mod 7)


def test_config_keys_reach_the_oracle(tiny_cfg):
    from opd.run.setup import build_setup

    teacher = build_setup(tiny_cfg(oracle_recover_prob=0.4, oracle_noise_kind="off_by_one", oracle_noise=0.2,
                                   oracle_two_orders=True)).env.teacher
    assert teacher.noise_kind == "off_by_one" and teacher.grammars["add"].next_token.__name__ == "two_orders_next_token"
    assert [(r, round(math.exp(w), 6)) for r, w in teacher._parts] == [(True, 0.4), (False, 0.6)]


def test_two_orders_puts_half_the_mass_on_each_operand_and_both_verify():
    """Where a step's operand digits differ, the teacher's first slot is the mixture of the
    two orders (entropy about log 2, against about 0.01 for one order); either order is no
    deviation, the second slot follows the first, and greedy and sampled solutions verify."""
    task, one = make_task("addition", 4), OracleTeacher(tokenizer=TOK)
    two = OracleTeacher(tokenizer=TOK, two_orders=True)
    spec = addition.AdditionSpec((2, 7, 4, 5), (5, 1, 9, 8))
    prompt = TOK(addition.prompt_text(spec)).input_ids
    p2 = two.next_logprobs(prompt, []).exp()
    assert float(p2[TOK.convert_tokens_to_ids("2")]) == pytest.approx(float(p2[TOK.convert_tokens_to_ids("5")]), abs=1e-6)
    entropy = lambda p: float(-(p * p.clamp_min(1e-30).log()).sum())  # noqa: E731
    assert entropy(p2) == pytest.approx(math.log(2), abs=0.02) and entropy(one.next_logprobs(prompt, []).exp()) < 0.02
    swapped = TOK("5 2 0 = 0 7 ; 1 7 0 = 0 8 ; 4 9 0 = 1 3 ; 5 8 1 = 1 4 ; ans 7 8 3 4 1 <eos>").input_ids
    targets = two.trace(prompt, swapped)
    assert [t.deviations for t in targets][-1] == 0  # both swaps are right
    assert TOK.convert_ids_to_tokens([targets[1].intended])[0] == "2"  # after 5, the other operand
    assert max(float(two.next_logprobs(prompt, swapped[:k]).max()) for k in range(len(swapped))) > -1e-3
    assert task.verify(task.make_problem(spec), TOK.decode(swapped))
    drawn = two.generate([prompt] * 200, max_new_tokens=40, generator=torch.Generator().manual_seed(0))
    firsts = [TOK.convert_ids_to_tokens(d[:1])[0] for d in drawn]
    assert 80 <= firsts.count("5") <= 120 and firsts.count("2") + firsts.count("5") >= 198
    assert sum(task.verify(task.make_problem(spec), TOK.decode(d)) for d in drawn) >= 196
