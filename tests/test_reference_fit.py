"""The reference-fit probe against a naive per-problem, per-token computation on ragged
prompts and solutions."""

import math

import pytest
import torch

from opd.diagnostics.reference_fit import part_ends, reference_fit
from opd.models.hf import load_model
from opd.testbed.tasks import make_task
from opd.testbed.tokenizer import build_tokenizer

TOK = build_tokenizer()
PAD = TOK.convert_tokens_to_ids("<pad>")


def _problems(task: str, h: int, n: int):
    probs = make_task(task, h).problems("test", n, 0)
    ids = lambda text: TOK(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [ids(p.prompt) for p in probs], [ids(p.solution) for p in probs]


def _naive(model, prompts, solutions, parts):
    """Each problem alone, each token read off one full-sequence forward pass."""
    rows = []
    for x, y in zip(prompts, solutions):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([x + y])).logits[0].float()
        logp = torch.log_softmax(logits[len(x) - 1: len(x) + len(y) - 1], -1)
        rows.append([(math.exp(float(logp[t, y[t]])), int(logp[t].argmax()) == y[t],
                      float(-(logp[t].exp() * logp[t]).sum())) for t in range(len(y))])
    out = {}
    for k in range(1, parts + 1):
        tokens = [tok for row, y in zip(rows, solutions) for tok in
                  row[math.ceil((k - 1) * len(y) / parts): math.ceil(k * len(y) / parts)]]
        upto = [row[: math.ceil(k * len(y) / parts)] for row, y in zip(rows, solutions)]
        out[k] = {"p_ref": sum(t[0] for t in tokens) / len(tokens), "argmax_ref": sum(t[1] for t in tokens) / len(tokens),
                  "entropy": sum(t[2] for t in tokens) / len(tokens),
                  "follow": sum(all(t[1] for t in r) for r in upto) / len(upto),
                  "p_follow": sum(math.prod(t[0] for t in r) for r in upto) / len(upto)}
    return out


def test_part_ends_split_the_solution_into_equal_shares():
    assert part_ends(10, 4) == [3, 5, 8, 10] and part_ends(3, 4) == [1, 2, 3, 3] and part_ends(8, 1) == [8]


@pytest.mark.parametrize("rows", [2, 32])  # ragged batches of two, and all at once
def test_reference_fit_matches_a_naive_per_token_computation(tiny_student_dir, rows):
    model = load_model(tiny_student_dir)
    (p4, s4), (p8, s8) = _problems("modchain", 4, 3), _problems("modchain", 8, 2)
    prompts, solutions = p4 + p8, s4 + s8
    assert len({len(x) for x in prompts}) > 1 and len({len(y) for y in solutions}) > 1  # ragged: no padding may leak
    got = reference_fit(model, prompts, solutions, PAD, parts=4, rows=rows)
    want = _naive(model, prompts, solutions, 4)
    for k in range(1, 5):
        assert got[k]["n"] == 5
        for key, value in want[k].items():
            assert got[k][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (k, key)
    assert want[4]["p_follow"] < want[1]["p_follow"]  # a random student: the reference gets less likely as it runs on
