"""The ring walk: a recoverable task, its verifier, and the oracle as DAgger's expert."""

import random

import pytest
import torch

from opd.testbed import ring
from opd.testbed.oracle import OracleTeacher
from opd.testbed.tasks import make_task
from opd.testbed.tokenizer import VOCAB, build_tokenizer

TOK = build_tokenizer(ring.WORDS)


def test_example_wraps_around_zero():
    spec = ring.RingSpec(31, 29, 1)
    assert ring.prompt_text(spec) == "ring 3 1 start 2 9 ; 0 1 ="
    assert ring.solution_text(spec) == "+ 3 0 ; + 0 0 ; + 0 1 ; ans 0 1"
    assert spec.horizon == 3
    assert ring.solution_text(ring.RingSpec(31, 1, 29)) == "- 0 0 ; - 3 0 ; - 2 9 ; ans 2 9"


@pytest.mark.parametrize("horizon", [1, 8, 16, 49])
def test_every_problem_is_exactly_horizon_moves_away(horizon):
    task = make_task("ring", horizon)
    for p in task.problems("train", 40, seed=1):
        spec = p.meta["spec"]
        assert 2 * horizon + 1 <= spec.m <= 99 and spec.horizon == horizon
        assert len(ring.reference_steps(spec)) == horizon
        assert task.verify(p, p.solution)


def test_a_test_split_of_500_distinct_problems():
    prompts = {p.prompt for p in make_task("ring", 8).problems("test", 1000, seed=0)}
    assert len(prompts) >= 500


@pytest.mark.parametrize("horizon", [0, 50])
def test_a_horizon_the_ring_cannot_hold_is_refused(horizon):
    with pytest.raises(ValueError, match="1 <= horizon <= 49"):
        make_task("ring", horizon)


def test_the_verifier_checks_the_walk_not_only_the_answer():
    task = make_task("ring", 3)
    p = task.make_problem(ring.RingSpec(31, 29, 1))
    ok = task.verify
    assert ok(p, "- 2 8 ; + 2 9 ; + 3 0 ; + 0 0 ; + 0 1 ; ans 0 1")  # one wrong move and back: 5 = 3 + 2
    assert not ok(p, "- 2 8 ; - 2 7 ; + 2 8 ; + 2 9 ; + 3 0 ; + 0 0 ; + 0 1 ; ans 0 1")  # 7 moves
    assert not ok(p, "ans 0 1")  # the answer copied from the prompt, no walk
    assert not ok(p, "+ 3 0 ; + 0 0 ; ans 0 1")  # stops one short of the target
    assert not ok(p, "+ 3 0 ; + 0 1 ; + 0 2 ; ans 0 1")  # a state written wrong (0 0 -> 0 1)
    assert not ok(p, "+ 3 0 ; * 0 0 ; + 0 1 ; ans 0 1")  # not a move
    assert ok(p, "+ 3 0 ; + 0 0 ; + 0 2 wait + 0 1 ; ans 0 1")  # corrected in the step
    assert ok(p, "+ 3 0 ; + 0 0 ; + 0 2 ; wait + 0 1 ; ans 0 1")  # corrected right after ";"
    assert ok(p, "+ 3 0 ; + 0 0 ; + 0 2 ; wait wait + 0 1 ; ans 0 1")  # a second wait drops nothing more
    assert ring.replay("+ 3 0 ; wait wait + 0 0 ;".split()) == [["+", "0", "0"], []]
    assert ring.walk(p.meta["spec"], "+ 3 0 ; + 0 0 ; ans 0 1") == (2, 0, True)
    assert ring.stops_short(p.meta["spec"], "+ 3 0 ; + 0 0 ; ans 0 1")  # answers one move early
    assert not ring.stops_short(p.meta["spec"], "+ 3 0 ; + 0 2 ; ans 0 1")  # a wrong state: not "short"
    assert not ring.stops_short(p.meta["spec"], "+ 3 0 ; + 0 0 ; + 0 1 ; ans 0 1")


def test_the_continuing_oracle_names_the_best_move_from_any_state():
    """DAgger's expert: after any walk so far, its greedy continuation reaches the target
    in exactly the distance that is left, and its first intended word is the best move."""
    oracle = OracleTeacher(make_task("ring", 5), TOK, recovers=False)
    rng = random.Random(0)
    for _ in range(40):
        spec = ring.random_spec(rng, 5)
        prompt = TOK(ring.prompt_text(spec)).input_ids
        v, words = spec.start, []
        for _ in range(rng.randrange(0, 4)):  # a random walk first, wrong moves included
            move = rng.choice(ring.MOVES)
            v = ring.step_to(v, move, spec.m)
            words += [move, *ring.two(v), ";"]
        left = ring.RingSpec(spec.m, v, spec.target).horizon
        tail = TOK.decode(oracle.generate([prompt], max_new_tokens=80, temperature=0,
                                          prefix_ids_list=[TOK(" ".join(words)).input_ids if words else []])[0])
        assert tail.split()[0] == (ring.best_move(v, spec.target, spec.m) or "ans")
        assert tail.split().count(";") == left
        assert tail.endswith(f"ans {' '.join(ring.two(spec.target))} <eos>")


@pytest.mark.parametrize("recovers", [True, False])
def test_a_wrong_move_is_a_legal_action_for_either_oracle(recovers):
    oracle = OracleTeacher(make_task("ring", 3), TOK, recovers=recovers)
    spec = ring.RingSpec(31, 29, 1)
    comp = "- 2 8 ; + 2 9 ; + 3 0 ; + 0 0 ; + 0 1 ; ans 0 1 <eos>"
    targets = oracle.trace(TOK(ring.prompt_text(spec)).input_ids, TOK(comp).input_ids)
    assert TOK.convert_ids_to_tokens([t.intended for t in targets]) == ["+"] + comp.split()[1:]
    assert TOK.convert_ids_to_tokens(list(targets[0].plausible)) == ["-", "ans"]
    assert [t.deviations for t in targets][:2] == [0, 1]  # still a deviation, for the decay


def test_a_state_written_wrong_is_a_mistake_the_recovering_oracle_redoes():
    spec = ring.RingSpec(31, 29, 1)
    prompt, comp = TOK(ring.prompt_text(spec)).input_ids, "+ 2 0 ; + 2 1"
    words = lambda o: TOK.convert_ids_to_tokens([t.intended for t in o.trace(prompt, TOK(comp).input_ids)])  # noqa: E731
    assert words(OracleTeacher(None, TOK, recovers=True)) == ["+", "3"] + ["wait"] * 5
    assert words(OracleTeacher(None, TOK, recovers=False)) == ["+", "3", "0", ";", "+", "2", "1"]  # 20 trusted


def test_the_extended_tokenizer_keeps_every_shared_id():
    base = build_tokenizer().get_vocab()
    vocab = TOK.get_vocab()
    assert all(vocab[w] == base[w] for w in VOCAB) and vocab["ring"] == len(VOCAB) == len(base)
    assert TOK("ring 3 1 start 0 1 ; 0 4 =").input_ids[0] == len(VOCAB)


def test_a_corrected_pool_solution_verifies():
    task = make_task("ring", 4)
    pool = task.pool("train", 256, seed=0, correction_rate=1.0)
    for p in pool[:50]:
        assert "wait" in p.solution.split() and task.verify(p, p.solution)


def _detour_rows(task, k, n=12):
    from opd.diagnostics.detour import planted_ids

    problems = task.problems("val", n, seed=0)
    return problems, [TOK(p.prompt).input_ids for p in problems], planted_ids(TOK, problems, k)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_the_detour_probe_on_the_oracle_and_on_a_habit(k):
    """DAgger's expert turns back at every planted detour and recovers; a student with the
    habit "repeat the last move" never turns back and never recovers."""
    from opd.diagnostics.detour import detour_shares

    task = make_task("ring", 8)
    problems, prompts, rows = _detour_rows(task, k)
    oracle = OracleTeacher(task, TOK)
    go = lambda prefixes: oracle.generate(prompts, max_new_tokens=60, temperature=0.0, prefix_ids_list=prefixes)  # noqa: E731
    verify = lambda i, c: task.verify(problems[i], TOK.decode(c))  # noqa: E731
    short = lambda i, c: ring.stops_short(problems[i].meta["spec"], TOK.decode(c))  # noqa: E731
    expert = detour_shares(rows, go([r[0] for r in rows]), go([r[1] for r in rows]), verify, short)
    assert expert == {"back": 1.0, "recovery": 1.0, "stops_short": 0.0, "clean_recovery": 1.0, "n": 12.0}
    def habit(moves_in_all):  # repeat the planted move, stop after ``moves_in_all`` moves
        out = []
        for p, (detour, _, _) in zip(problems, rows):
            spec, words = p.meta["spec"], TOK.convert_ids_to_tokens(detour)
            v, move, tail = ring.number(words[-3:-1]), words[-4], []
            for _ in range(moves_in_all - k):
                v = ring.step_to(v, move, spec.m)
                tail += [move, *ring.two(v), ";"]
            out.append(TOK(" ".join(tail + ["ans", *ring.two(spec.target), "<eos>"])).input_ids)
        return out

    shares = detour_shares(rows, habit(8 + 2), go([r[1] for r in rows]), verify, short)
    assert shares["back"] == 0.0 and shares["recovery"] == 0.0 and shares["clean_recovery"] == 1.0
    counted = detour_shares(rows, habit(8), go([r[1] for r in rows]), verify, short)
    assert counted["stops_short"] == 1.0 and counted["recovery"] == 0.0


def test_the_detour_probe_runs_a_model():
    from opd.diagnostics.detour import detour_depth
    from opd.testbed.builder import init_model

    task = make_task("ring", 4)
    model = init_model(TOK, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2), seed=0)
    problems = task.problems("val", 4, seed=0)
    out = detour_depth(model.eval(), TOK, problems, 2, lambda p, c: task.verify(p, TOK.decode(c)), eos_id=TOK.eos_token_id,
                       pad_id=TOK.pad_token_id, max_new_tokens=12, encode_prompt=lambda p: TOK(p.prompt).input_ids)
    assert out["n"] == 4 and all(0.0 <= out[key] <= 1.0 for key in ("back", "recovery", "stops_short", "clean_recovery"))


def test_noise_on_legal_moves_only_gives_detours_that_walk_back():
    """``noise_legal_only``: the noise mass sits on the other move and nowhere else (every
    digit slot is the noise-free oracle's), so samples take detours, walk back, never slip."""
    task = make_task("ring", 8)
    clean, noisy = OracleTeacher(task, TOK), OracleTeacher(task, TOK, noise=0.1, noise_legal_only=True)
    spec = ring.RingSpec(31, 29, 6)
    prompt, done = TOK(ring.prompt_text(spec)).input_ids, TOK("+ 3 0 ; + 0 0").input_ids
    move = noisy.next_logprobs(prompt, done + TOK(";").input_ids).exp()
    assert float(move[TOK.convert_tokens_to_ids("-")]) == pytest.approx(0.1, abs=1e-3)
    assert float(move[TOK.convert_tokens_to_ids("ans")]) < 1e-4  # not a legal alternative
    for k in (1, 2, 3, 5, 6):  # the digit and ";" slots of "+ 3 0 ; + 0 0" (0 and 4 are moves)
        assert torch.allclose(noisy.next_logprobs(prompt, done[:k]), clean.next_logprobs(prompt, done[:k]))
    problems = task.problems("train", 100, seed=0)
    drawn = noisy.generate([TOK(p.prompt).input_ids for p in problems], max_new_tokens=120,
                           generator=torch.Generator().manual_seed(0))
    texts = [TOK.decode(d) for d in drawn]
    assert sum("wait" in t for t in texts) <= 10  # only the sharpness's e^-10 slips, as without noise
    walks = [ring.walk(p.meta["spec"], t) for p, t in zip(problems, texts)]
    assert sum(state == p.meta["spec"].target and answered for p, (_, state, answered) in zip(problems, walks)) >= 90
    assert sum(moves > 8 for moves, _, _ in walks) >= 40  # about 1 - 0.9^8 = 57% of them take a detour
