"""Where a student's first mistake sits (testbed): the step of its first deviation.

For each rollout ``y`` of a held-out prompt, ``t`` is the first position where ``y``
differs from the word the oracle intends there (:func:`opd.diagnostics.probe.first_deviation`)
and its step is the number of step separators ``;`` before it::

    step(y) = #{s < t : y_s = ;}        (0-based; ``>= horizon``: the answer)

Reported as shares of all rollouts: ``by_step[k]`` (first mistake in step ``k``),
``answer`` (every step right, the answer wrong) and ``none`` (no deviation), with the
step that holds the most first mistakes and its share of them. Horizon decay (pitfall 2)
spreads mistakes along the rollout; a student whose first mistakes pile up in one step
has a gap at that step (a lookup it has not learned), which no horizon effect explains.
With a per-step error rate ``e`` the same at every step, ``by_step[k] = e (1 - e)^k``.

Pure measurement: the oracle and the tokenized rollouts come in as arguments.
"""

from __future__ import annotations

from opd.diagnostics.probe import first_deviation


def first_mistake_step(oracle, prompt: list[int], completion: list[int], sep_id: int) -> int | None:
    """The 0-based step of ``completion``'s first deviation from ``oracle``; ``None``: none."""
    t = first_deviation(oracle, prompt, completion)
    return None if t is None else completion[:t].count(sep_id)


def first_mistake_shares(oracle, prompts: list[list[int]], completions: list[list[int]], sep_id: int,
                         horizon: int) -> dict:
    """The shares above over ``len(prompts)`` rollouts (module doc)."""
    steps = [first_mistake_step(oracle, x, y, sep_id) for x, y in zip(prompts, completions)]
    n = len(steps)
    by_step = [sum(s == k for s in steps) / n for k in range(horizon)]
    answer = sum(s is not None and s >= horizon for s in steps) / n
    none = sum(s is None for s in steps) / n
    wrong = 1.0 - none
    mode = max(range(horizon), key=lambda k: by_step[k])
    return {"by_step": by_step, "answer": answer, "none": none, "n": n, "mode_step": mode,
            "mode_share": by_step[mode] / wrong if wrong else float("nan")}
