"""Order probe (addition, two orders): does the student open a step with either operand,
and can it finish the step it opened the other way?

Where the teacher lets a step write its two operand digits in either order
(``oracle_two_orders``: ``a b c = t u`` or ``b a c = t u``), both orders are right, so the
teacher's entropy at a step's first word is legitimate. Whether diversity of order can help
(entropy-aware OPD's claim: pass@k) depends on the student: an order it opens but cannot
finish only adds mistakes. For a held-out addition problem and a depth ``k``
(``1 <= k <= horizon``, problems with ``a_k != b_k`` only) the prefix is the reference's
first ``k - 1`` steps (written ``a b``); then, from the model:

- ``p_swap``: its probability of opening step ``k`` with ``b_k``, ``pi(b_k | x, prefix)``;
- ``swap_onset``: the share whose greedy next word is ``b_k``;
- ``swap_finish``: the share whose greedy continuation after ``prefix + b_k`` writes
  ``a_k`` next (the step in the other order, its second word right);
- ``swap_recovery``: the share whose completion ``prefix + b_k + continuation`` verifies;
- ``clean_recovery``: the same from ``prefix + a_k`` (the reference's order), the baseline.

Pure measurement: the model, the tokenizer and the verifier come in as arguments.
"""

from __future__ import annotations

from opd.diagnostics.probe import greedy_continuations, next_token_logp, recovery_rate
from opd.testbed import addition

KEYS = ("p_swap", "swap_onset", "swap_finish", "swap_recovery", "clean_recovery")


def order_prefixes(spec: addition.AdditionSpec, k: int) -> tuple[list[str], str, str]:
    """``(prefix_words, a_k, b_k)`` at depth ``k``: the reference's first ``k - 1`` steps."""
    rows = addition.reference_steps(spec)
    if not 1 <= k <= len(rows):
        raise ValueError(f"depth k={k} outside 1..{len(rows)} (the problem's steps)")
    prefix = [w for row in rows[: k - 1] for w in row + [addition.SEP]]
    return prefix, str(spec.a[k - 1]), str(spec.b[k - 1])


def two_order_problems(problems, k: int) -> list:
    """The problems whose step ``k`` has two different operand digits (two orders)."""
    return [p for p in problems if p.meta["spec"].a[k - 1] != p.meta["spec"].b[k - 1]]


def order_rows(tokenizer, problems, k: int) -> list[tuple[list[int], int, int]]:
    """Per problem ``(prefix_ids, a_id, b_id)`` at depth ``k`` (:func:`order_prefixes` tokenized)."""
    ids = lambda words: tokenizer(" ".join(words), add_special_tokens=False)["input_ids"] if words else []  # noqa: E731
    return [(ids(q), ids([a])[0], ids([b])[0]) for q, a, b in (order_prefixes(p.meta["spec"], k) for p in problems)]


def order_shares(rows, opened: list[list[int]], swap_cont: list[list[int]], clean_cont: list[list[int]], p_swap_N,
                 verify) -> dict[str, float]:
    """The shares of the module doc from the model's first greedy word after each prefix
    (``opened``), its continuations after ``prefix + b_k`` (``swap_cont``) and after
    ``prefix + a_k`` (``clean_cont``), and ``pi(b_k | x, prefix)`` per row (``p_swap_N``);
    ``verify(i, completion_ids)`` checks row ``i``."""
    n = len(rows)
    return {
        "p_swap": float(sum(p_swap_N) / n),
        "swap_onset": sum(bool(o) and o[0] == r[2] for o, r in zip(opened, rows)) / n,
        "swap_finish": sum(bool(c) and c[0] == r[1] for c, r in zip(swap_cont, rows)) / n,
        "swap_recovery": recovery_rate([r[0] + [r[2]] for r in rows], swap_cont, verify),
        "clean_recovery": recovery_rate([r[0] + [r[1]] for r in rows], clean_cont, verify),
        "n": float(n),
    }


def order_depth(model, tokenizer, problems, k: int, verify_fn, *, eos_id: int, pad_id: int, max_new_tokens: int,
                encode_prompt) -> dict[str, float]:
    """:func:`order_shares` at depth ``k`` from the model's greedy continuations, over the
    problems with two orders there; ``verify_fn(problem, completion_ids)`` checks a completion."""
    problems = two_order_problems(problems, k)
    if not problems:
        return {key: float("nan") for key in KEYS} | {"n": 0.0}
    rows, prompts = order_rows(tokenizer, problems, k), [encode_prompt(p) for p in problems]
    kw = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    go = lambda prefixes, **more: greedy_continuations(model, prompts, prefixes, **{**kw, **more})  # noqa: E731
    p_swap_N = next_token_logp(model, prompts, [r[0] for r in rows], [r[2] for r in rows], pad_id).exp().tolist()
    return order_shares(rows, go([r[0] for r in rows], max_new_tokens=1), go([r[0] + [r[2]] for r in rows]),
                        go([r[0] + [r[1]] for r in rows]), p_swap_N, lambda i, c: verify_fn(problems[i], c))
