import random

import pytest

from opd.testbed import addition, modchain, modchain_labeled, ring
from opd.testbed.tasks import GRAMMARS, TASKS, make_task
from opd.testbed.steps import extract_answer, split_of

NAMES = ("addition", "modchain", "modchain_labeled", "ring")
KEYWORDS = {"addition": "add", "modchain": "mod", "modchain_labeled": "chain", "ring": "ring"}


def test_examples_at_horizon_4():
    spec = addition.AdditionSpec((2, 7, 4, 5), (5, 1, 9, 8))  # 5472 + 8915 = 14387
    assert addition.prompt_text(spec) == "add 2 7 4 5 + 5 1 9 8 ="
    assert addition.solution_text(spec) == (
        "2 5 0 = 0 7 ; 7 1 0 = 0 8 ; 4 9 0 = 1 3 ; 5 8 1 = 1 4 ; ans 7 8 3 4 1"
    )
    assert addition.answer_text(spec) == "7 8 3 4 1"
    spec = modchain.ModChainSpec(7, 3, (("+", 4), ("*", 2), ("-", 5), ("*", 3)))
    assert modchain.prompt_text(spec) == "mod 7 start 3 + 4 * 2 - 5 * 3 ="
    assert modchain.solution_text(spec) == "3 + 4 = 0 ; 0 * 2 = 0 ; 0 - 5 = 2 ; 2 * 3 = 6 ; ans 6"
    assert modchain_labeled.prompt_text(spec) == "chain 7 start 3 s1 + 4 s2 * 2 s3 - 5 s4 * 3 ="
    assert modchain_labeled.solution_text(spec) == "3 s1 + 4 = 0 ; 0 s2 * 2 = 0 ; 0 s3 - 5 = 2 ; 2 s4 * 3 = 6 ; ans 6"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("horizon", [1, 2, 4, 8])
def test_reference_solutions_verify_and_parse(name, horizon):
    task = make_task(name, horizon)
    grammar = GRAMMARS[KEYWORDS[name]]
    for p in task.problems("train", 50, seed=horizon):
        assert task.verify(p, p.solution)
        assert task.verify(p, p.solution + " <eos> <pad> <pad>")
        assert task.extract_answer(p.solution) == p.answer
        assert "wait" not in p.solution.split()
        assert len(p.solution.split()) + 1 == task.solution_tokens <= 8 * horizon + 3
        assert grammar.parse_prompt(p.prompt.split()) == p.meta["spec"]
        assert p.meta["horizon"] == horizon


def test_token_budget():
    assert make_task("addition", 4).solution_tokens == 35
    assert make_task("addition", 8).solution_tokens == 67
    assert make_task("modchain", 4).solution_tokens == 27
    assert make_task("modchain", 8).solution_tokens == 51
    assert make_task("ring", 8).solution_tokens == 36
    assert make_task("modchain_labeled", 16).solution_tokens == 115
    assert make_task("modchain_labeled", 32).solution_tokens == 227
    with pytest.raises(ValueError, match="horizons 1 to 32, not 33"):
        make_task("modchain_labeled", 33)


def test_labeled_modchain_is_modchain_with_labels():
    """The same problems as modchain (the spec), each step and operation with its label; a
    prompt whose labels are out of order or missing is not this family's."""
    plain, labeled = make_task("modchain", 6), make_task("modchain_labeled", 6)
    rng_a, rng_b = random.Random(0), random.Random(0)
    for _ in range(20):
        a, b = plain.make_problem(plain.draw_spec(rng_a)), labeled.make_problem(labeled.draw_spec(rng_b))
        assert a.meta["spec"] == b.meta["spec"] and a.answer == b.answer
        assert [w for w in b.solution.split() if w not in modchain_labeled.LABELS] == a.solution.split()
    for bad in ["chain 7 start 3 s2 + 4 =", "chain 7 start 3 + 4 =", "chain 7 start 3 s1 + 4 s1 * 2 ="]:
        assert modchain_labeled.parse_prompt(bad.split()) is None


def test_labeled_steps_put_the_label_before_the_operation():
    """Format 2: a step is ``v s<i> o d = r``; the label has no plausible wrong words, the
    other words are modchain's (with the same alternatives), and a step without its label
    in second place does not fit the grammar."""
    spec = modchain_labeled.parse_prompt("chain 7 start 3 s1 + 4 s2 * 2 =".split())
    done = [("3", "s1", "+", "4", "=", "0")]
    assert modchain_labeled.next_token(spec, [], []) == modchain.next_token(spec, [], [])
    assert modchain_labeled.next_token(spec, done, ["0"]) == ("s2", ())
    assert modchain_labeled.next_token(spec, done, ["0", "s2"]) == modchain.next_token(spec, [("3", "+", "4", "=", "0")], ["0"])
    assert modchain_labeled.next_token(spec, done, ["0", "s2", "*", "2", "="])[0] == "0"
    for wrong in (["0", "s1"], ["0", "*"], ["0", "s3", "*"]):
        assert modchain_labeled.next_token(spec, done, wrong) == (None, ())
    assert modchain_labeled.next_token(spec, [*done, ("0", "s2", "*", "2", "=", "0")], [])[0] == "ans"


BAD_PROMPTS = ["", "add", "add 1 + =", "add 1 2 + 3 =", "add 1 + x =", "mod 7 3 + 4 =", "ring 3 1 start 3 2 ; 0 1 =",
               "ring 3 1 start 0 2 0 1 =", "ring 3 1 start 0 2 ; 0 1"]


@pytest.mark.parametrize("bad", BAD_PROMPTS)
def test_parse_rejects_malformed_prompts(bad):
    words = bad.split()
    assert addition.parse_prompt(words) is None
    assert modchain.parse_prompt(words) is None
    assert ring.parse_prompt(words) is None


def test_extract_answer_takes_the_last_answer():
    assert extract_answer("1 2 0 = 0 3 ; ans 3 0") == "3 0"
    assert extract_answer("1 2 0 = 0 4 wait 1 2 0 = 0 3 ; ans 3 0 <eos>") == "3 0"
    assert extract_answer("ans 4 wait ans 3 0 <eos> ans 9") == "3 0"  # nothing after eos counts
    assert extract_answer("<bos> ans 3 <eos> <pad>") == "3"
    assert extract_answer("1 2 0 = 0 3 ;") is None
    assert extract_answer("ans") is None
    assert extract_answer("ans 3 wait") is None
    assert extract_answer("ans 3 ;") is None


@pytest.mark.parametrize("name", NAMES)
def test_verifier_rejects_wrong_and_accepts_corrected(name):
    task = make_task(name, 4)
    for p in task.problems("val", 20, seed=0):
        words = p.solution.split()
        wrong = words[:-1] + [str((int(words[-1]) + 1) % 10)]
        assert not task.verify(p, " ".join(wrong))
        assert not task.verify(p, " ".join(words[:-1]))  # truncated answer
        assert not task.verify(p, p.solution.replace("ans", "wait"))
        # a wrong first step then its correction; only the final answer counts
        first = words.index(";")
        step = words[:first]
        bad = step[:-1] + [str((int(step[-1]) + 1) % 10)]
        corrected = bad + ["wait"] + words
        assert task.verify(p, " ".join(corrected))
        assert task.verify(p, " ".join(wrong + ["wait", "ans", p.answer]))


@pytest.mark.parametrize("name", NAMES)
def test_splits_disjoint_seeded_and_hashed(name):
    task = make_task(name, 3)
    prompts = {s: {p.prompt for p in task.problems(s, 150, 0)} for s in ("train", "val", "test")}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    for s, ps in prompts.items():
        assert all(split_of(p) == s for p in ps)
    again = [p.prompt for p in task.problems("val", 30, seed=0)]
    assert again == [p.prompt for p in task.problems("val", 30, seed=0)]
    assert again != [p.prompt for p in task.problems("val", 30, seed=1)]
    with pytest.raises(ValueError):
        task.problems("dev", 1, 0)


def test_split_fractions():
    task = make_task("addition", 6)
    rng = random.Random(0)
    counts = {"train": 0, "val": 0, "test": 0}
    for _ in range(4000):
        counts[split_of(addition.prompt_text(addition.random_spec(rng, 6)))] += 1
    assert 0.76 < counts["train"] / 4000 < 0.84
    assert 0.07 < counts["val"] / 4000 < 0.13
    assert task.name == "addition"


def test_modchain_one_wrong_value_spoils_the_answer():
    rng = random.Random(0)
    for _ in range(200):
        spec = modchain.random_spec(rng, 5)
        i = rng.randrange(5)
        v = int(modchain.reference_steps(spec)[i][4])
        for wrong in set(range(spec.m)) - {v}:
            for op, d in spec.ops[i + 1 :]:
                wrong = modchain.apply(wrong, op, d, spec.m)
            assert str(wrong) != modchain.answer_text(spec)


def test_registry():
    assert set(TASKS) == set(NAMES) | {"addition_swapped", "addition_mixed"}
    task = make_task("modchain", 6, moduli=(7,))
    assert task.horizon == 6 and all(p.meta["spec"].m == 7 for p in task.problems("train", 10, 0))
    with pytest.raises(KeyError):
        make_task("sorting", 4)


@pytest.mark.parametrize("name", NAMES)
def test_a_pool_drawn_on_demand_is_fixed_and_stays_in_its_split(name):
    from opd.testbed.steps import split_of
    from opd.testbed.tasks import make_task

    task = make_task(name, 4)
    pool = task.pool("train", 1 << 16, seed=3)
    assert len(pool) == 1 << 16
    picked = [pool[i] for i in (0, 17, 65535, -1)]
    assert [p.prompt for p in picked] == [task.pool("train", 1 << 16, seed=3)[i].prompt for i in (0, 17, 65535, -1)]
    assert picked[2].prompt == picked[3].prompt and pool[0].prompt != pool[1].prompt
    assert all(split_of(p.prompt) == "train" for p in pool[:200])
    held_out = {p.prompt for p in task.problems("val", 200, 0) + task.problems("test", 200, 0)}
    assert not held_out & {p.prompt for p in pool[:2000]}
    assert pool[5].prompt != task.pool("train", 1 << 16, seed=4)[5].prompt  # the seed matters
    with pytest.raises(IndexError):
        pool[1 << 16]


@pytest.mark.parametrize("name", ["addition", "modchain", "modchain_labeled"])
def test_corrected_solutions_redo_one_step_and_verify(name):
    from opd.testbed.tasks import make_task

    task = make_task(name, 3)
    clean = task.pool("train", 4000, seed=0)
    mixed = task.pool("train", 4000, seed=0, correction_rate=0.25)
    corrected = 0
    for i in range(400):
        a, b = clean[i], mixed[i]
        assert a.prompt == b.prompt and a.answer == b.answer  # the same problems
        if b.solution == a.solution:
            continue
        corrected += 1
        words, ref = b.solution.split(), a.solution.split()
        w = words.index("wait")
        assert words.count("wait") == 1 and words[w - 1] != ref[w - 1]  # one wrong word, then wait
        start = max(i for i, x in enumerate(words[:w]) if x == ";") + 1 if ";" in words[:w] else 0
        assert words[:start] + words[w + 1:] == ref  # dropping the abandoned part gives the reference
        assert task.verify(b, b.solution + " <eos>")
    assert 70 <= corrected <= 130  # ~25% of 400


@pytest.mark.parametrize("name", ["addition", "modchain", "modchain_labeled", "ring"])
def test_shorter_rate_mixes_in_shorter_horizons_and_leaves_the_rest_alone(name):
    from opd.testbed.tasks import make_task

    task = make_task(name, 6)
    plain, none, mixed = task.pool("train", 4000, seed=0), task.pool("train", 4000, seed=0, shorter_rate=0.0), \
        task.pool("train", 4000, seed=0, shorter_rate=0.5)
    assert [none[i].prompt for i in range(50)] == [plain[i].prompt for i in range(50)]  # rate 0: the same stream
    horizons = [mixed[i].meta["horizon"] for i in range(400)]
    assert set(horizons) == {1, 2, 3, 4, 5, 6}  # every shorter horizon, drawn uniformly
    assert 160 <= sum(h < 6 for h in horizons) <= 240  # ~50% of 400
    assert all(task.verify(mixed[i], mixed[i].solution + " <eos>") for i in range(100))
    assert {p.meta["horizon"] for p in task.problems("val", 50, 0)} == {6}  # evaluation stays at the horizon


def test_correction_rate_is_refused_for_a_dataset(tiny_cfg, tmp_path):
    from opd.errors import UserError
    from opd.run.setup import build_setup

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "add {i % 10} {i // 10} + 1 1 =", "answer": "1", "solution": "x"}}\n' for i in range(60)))
    with pytest.raises(UserError, match="correction_rate=0.05 applies to the synthetic testbed tasks only"):
        build_setup(tiny_cfg(dataset=str(data), correction_rate=0.05, method="sft"))
    with pytest.raises(UserError, match="shorter_rate=0.5 applies to the synthetic testbed tasks only"):
        build_setup(tiny_cfg(dataset=str(data), shorter_rate=0.5, method="sft"))


def test_the_swapped_style_writes_the_same_problems_b_first():
    from opd.testbed.oracle import OracleTeacher
    from opd.testbed.tokenizer import build_tokenizer

    plain, swapped = make_task("addition", 4), make_task("addition_swapped", 4)
    for split in ("train", "test"):
        a, b = plain.problems(split, 40, 0), swapped.problems(split, 40, 0)
        assert [(p.prompt, p.answer) for p in a] == [(p.prompt, p.answer) for p in b]
        for p, q in zip(a, b):
            *steps_p, tail_p = p.solution.split(" ; ")
            *steps_q, tail_q = q.solution.split(" ; ")
            assert [[s.split()[1], s.split()[0], *s.split()[2:]] for s in steps_p] == [s.split() for s in steps_q]
            assert tail_p == tail_q and len(steps_q) == 4
            assert plain.verify(p, q.solution) and swapped.verify(q, q.solution)
    spec = addition.AdditionSpec((2, 7, 4, 5), (5, 1, 9, 8))
    assert addition.swapped_solution_text(spec) == "5 2 0 = 0 7 ; 1 7 0 = 0 8 ; 9 4 0 = 1 3 ; 8 5 1 = 1 4 ; ans 7 8 3 4 1"
    # both styles are right for the two-order oracle: no deviation in either
    tok = build_tokenizer()
    oracle = OracleTeacher(tokenizer=tok, two_orders=True)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    p = b[0]
    for text in (a[0].solution, p.solution):
        assert [target.deviations for target in oracle.trace(ids(p.prompt), ids(text))][-1] == 0


def test_the_mixed_style_writes_each_step_in_an_order_drawn_for_it():
    from opd.testbed.oracle import OracleTeacher
    from opd.testbed.tokenizer import build_tokenizer

    plain, mixed = make_task("addition", 4), make_task("addition_mixed", 4)
    a, b = plain.problems("test", 60, 0), mixed.problems("test", 60, 0)
    assert [(p.prompt, p.answer) for p in a] == [(p.prompt, p.answer) for p in b]
    assert [p.solution for p in b] == [p.solution for p in mixed.problems("test", 60, 0)]  # the same draw every time
    swapped = kept = 0
    for p, q in zip(a, b):
        steps_p, steps_q = [s.split() for s in p.solution.split(" ; ")[:4]], [s.split() for s in q.solution.split(" ; ")[:4]]
        for sp, sq in zip(steps_p, steps_q):
            assert sq in (sp, [sp[1], sp[0], *sp[2:]])
            if sp[0] != sp[1]:
                swapped, kept = swapped + (sq != sp), kept + (sq == sp)
        assert p.solution.split(" ; ")[4] == q.solution.split(" ; ")[4] and mixed.verify(q, q.solution)
    assert 0.35 < swapped / (swapped + kept) < 0.65  # about half of the steps with two orders, of ~220
    tok = build_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    deviations = lambda oracle, p: [t.deviations for t in oracle.trace(ids(p.prompt), ids(p.solution))][-1]
    assert all(deviations(OracleTeacher(tokenizer=tok, two_orders=True), q) == 0 for q in b)
    assert sum(deviations(OracleTeacher(tokenizer=tok, recovers=False), q) > 0 for q in b) > 40


def test_the_swapped_teacher_exists_for_addition_only():
    from opd.errors import UserError
    from opd.testbed.builder import prepare_teacher

    with pytest.raises(UserError, match="exists for task addition, not 'modchain'.*teacher=testbed"):
        prepare_teacher("modchain", 4, style="swapped")

