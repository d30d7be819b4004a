"""The order probe (:mod:`opd.diagnostics.orders`): the two-order oracle opens either order
half the time and finishes both; the one-order oracle that goes on from what is written, made
to open with ``b``, writes ``b`` again and misses; on a model, ``p_swap`` is the naive softmax."""

import pytest
import torch

from opd.diagnostics import orders
from opd.testbed import addition
from opd.testbed.oracle import OracleTeacher
from opd.testbed.tasks import make_task
from opd.testbed.tokenizer import build_tokenizer

TOK = build_tokenizer()
TASK = make_task("addition", 4)


def test_the_prefix_is_the_reference_before_step_k():
    spec = addition.AdditionSpec((2, 7, 4, 5), (5, 1, 9, 8))
    assert orders.order_prefixes(spec, 1) == ([], "2", "5")
    assert orders.order_prefixes(spec, 3) == ("2 5 0 = 0 7 ; 7 1 0 = 0 8 ;".split(), "4", "9")
    with pytest.raises(ValueError, match="k=5 outside 1..4"):
        orders.order_prefixes(spec, 5)


def _shares(oracle, problems, k):
    rows = orders.order_rows(TOK, problems, k)
    prompts = [TOK(p.prompt).input_ids for p in problems]
    go = lambda prefixes, n=40: oracle.generate(prompts, max_new_tokens=n, temperature=0.0, prefix_ids_list=prefixes)  # noqa: E731
    p_swap = [float(oracle.next_logprobs(x, r[0])[r[2]].exp()) for x, r in zip(prompts, rows)]
    verify = lambda i, c: TASK.verify(problems[i], TOK.decode(c))  # noqa: E731
    return orders.order_shares(rows, go([r[0] for r in rows], 1), go([r[0] + [r[2]] for r in rows]),
                               go([r[0] + [r[1]] for r in rows]), p_swap, verify)


@pytest.mark.parametrize("k", [1, 3])
def test_the_two_order_oracle_opens_either_and_finishes_both_the_one_order_oracle_only_its_own(k):
    problems = orders.two_order_problems(TASK.problems("test", 24, seed=0), k)
    assert 0 < len(problems) < 24 and all(p.meta["spec"].a[k - 1] != p.meta["spec"].b[k - 1] for p in problems)
    both = _shares(OracleTeacher(TASK, TOK, two_orders=True), problems, k)
    assert both["p_swap"] == pytest.approx(0.5, abs=1e-3)
    assert both["swap_finish"] == both["swap_recovery"] == both["clean_recovery"] == 1.0
    one = _shares(OracleTeacher(TASK, TOK, recovers=False), problems, k)  # goes on from what is written
    assert one["p_swap"] < 1e-3 and one["swap_onset"] == 0.0
    assert one["swap_finish"] == 0.0 and one["swap_recovery"] == 0.0 and one["clean_recovery"] == 1.0
    assert one["n"] == both["n"] == len(problems)


def test_the_probe_runs_a_model_and_p_swap_is_its_softmax():
    from opd.testbed.builder import init_model

    model = init_model(TOK, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2), seed=0).eval()
    problems = TASK.problems("val", 6, seed=0)
    k = 2
    out = orders.order_depth(model, TOK, problems, k, lambda p, c: TASK.verify(p, TOK.decode(c)), eos_id=TOK.eos_token_id,
                             pad_id=TOK.pad_token_id, max_new_tokens=12, encode_prompt=lambda p: TOK(p.prompt).input_ids)
    kept = orders.two_order_problems(problems, k)
    assert out["n"] == len(kept) and all(0.0 <= out[key] <= 1.0 for key in orders.KEYS)
    naive = []
    for p, (prefix, _, b) in zip(kept, orders.order_rows(TOK, kept, k)):
        ids = torch.tensor([TOK(p.prompt).input_ids + prefix])
        with torch.no_grad():
            naive.append(torch.softmax(model(ids).logits[0, -1].float(), -1)[b].item())
    assert out["p_swap"] == pytest.approx(sum(naive) / len(naive), rel=1e-4)
