"""Detour probe (ring walk): plant one wrong move and see whether the student walks back.

DAgger's question. For a held-out ring problem and a depth ``k`` (``1 <= k <= horizon``)
the prefix is the reference walk's first ``k - 1`` steps, then the *other* move (a legal
action), the state it leads to written right, and ``;``::

    from 07 to 15, k = 2:   + 0 8 ; - 0 7 ;        (the reference: + 0 8 ; + 0 9 ;)

From there the best walk turns back (except where the modulus is ``2h + 1`` and the detour
at ``k = 1`` makes both ways equally short); with the detour it takes ``h + 2`` moves, which
the verifier allows (slack 2). A student trained only on shortest walks never saw a state off
the shortest arc; whether it turns back says if it learned the move from the state or a
habit (repeat the last move). Measured on greedy continuations:

- ``back``: the share whose first word is the best move from the planted state;
- ``recovery``: the share whose completion (prefix + continuation) verifies;
- ``stops_short``: the share whose walk, every state written right, answers before it
  reaches the target (the habit of counting ``horizon`` moves, which every shortest walk
  in training allows);
- ``clean_recovery``: the same as ``recovery`` from the reference's first ``k`` steps (no
  detour), the baseline the detour is read against.

Pure measurement: the model, the tokenizer and the verifier come in as arguments.
"""

from __future__ import annotations

from opd.diagnostics.probe import greedy_continuations, recovery_rate
from opd.testbed import ring


def plant_detour(spec: ring.RingSpec, k: int) -> tuple[list[str], list[str], str]:
    """``(detour_words, clean_words, back_move)`` at depth ``k`` (module doc)."""
    steps = ring.reference_steps(spec)
    if not 1 <= k <= len(steps):
        raise ValueError(f"depth k={k} outside 1..{len(steps)} (the walk's moves)")
    words = lambda rows: [w for row in rows for w in row + [ring.SEP]]  # noqa: E731
    v = spec.start if k == 1 else ring.number(steps[k - 2][1:])  # the state before move k
    other = "-" if steps[k - 1][0] == "+" else "+"
    off = ring.step_to(v, other, spec.m)
    back = ring.best_move(off, spec.target, spec.m)
    return words(steps[: k - 1] + [[other, *ring.two(off)]]), words(steps[:k]), back


def detour_depth(model, tokenizer, problems, k: int, verify_fn, *, eos_id: int, pad_id: int, max_new_tokens: int,
                 encode_prompt) -> dict[str, float]:
    """``back``, ``recovery``, ``stops_short`` and ``clean_recovery`` (module doc) at depth
    ``k`` from the model's greedy continuations; ``verify_fn(problem, completion_ids)`` checks a completion."""
    rows = planted_ids(tokenizer, problems, k)
    prompts = [encode_prompt(p) for p in problems]
    kw = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    cont = greedy_continuations(model, prompts, [r[0] for r in rows], **kw)
    clean_cont = greedy_continuations(model, prompts, [r[1] for r in rows], **kw)
    short = lambda i, c: ring.stops_short(problems[i].meta["spec"], tokenizer.decode(c))  # noqa: E731
    return detour_shares(rows, cont, clean_cont, lambda i, c: verify_fn(problems[i], c), short)


def planted_ids(tokenizer, problems, k: int) -> list[tuple[list[int], list[int], int]]:
    """Per problem ``(detour_ids, clean_ids, back_id)``: :func:`plant_detour` tokenized."""
    ids = lambda words: tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]  # noqa: E731
    return [(ids(d), ids(c), ids([b])[0]) for d, c, b in (plant_detour(p.meta["spec"], k) for p in problems)]


def detour_shares(rows, cont: list[list[int]], clean_cont: list[list[int]], verify, short) -> dict[str, float]:
    """The shares of the module doc from the continuations of the detours (``cont``) and of
    the clean prefixes (``clean_cont``); ``verify(i, completion_ids)`` checks row ``i``,
    ``short(i, completion_ids)`` says whether its walk stops short of the target."""
    return {
        "back": sum(bool(c) and c[0] == r[2] for c, r in zip(cont, rows)) / len(cont),
        "recovery": recovery_rate([r[0] for r in rows], cont, verify),
        "stops_short": recovery_rate([r[0] for r in rows], cont, short),
        "clean_recovery": recovery_rate([r[1] for r in rows], clean_cont, verify),
        "n": float(len(rows)),
    }
