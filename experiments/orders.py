"""EOPD's two orders on the testbed: does the trained student open a step the other way, and finish it?

    python experiments/orders.py [NAME] [--out runs/NAME] [--jobs N] [--probe-prompts 128] [--set KEY=VALUE ...]

Runs ``experiments/NAME.yaml`` (default ``eopd_orders_tune2``, ``eopd_orders`` tuned on two
seeds: OPD on the one-order oracle, OPD and EOPD on the oracle that lets a step write its
operands in either order; ``eopd_orders_mixed``: the same from a base that learned both
orders) with ``opd compare`` under the protocol (finished runs are reused), then the order probe
(:mod:`opd.diagnostics.orders`) on the base and on every reported seed's final checkpoint:
held-out reference solutions cut before step k (k = 1, 2, 4), on the problems whose step k
has two different operand digits. Per run and depth: the student's probability of opening
step k with the second operand (``p_swap``), how often its greedy step opens so, how often
after that opening it writes the first operand next (the other order, finished), how often
the whole solution then verifies, and the same from the reference's own opening. ``p_swap``,
the onset and the recovery after the other opening, each the mean over depths, get verdicts
by the same rule as accuracy. EOPD's forward KL at the step's first word pulls ``p_swap``
toward the teacher's one half; whether that helps depends on whether the student can finish
the order it is pulled to. Writes ``docs/results/NAME.md`` (with an order section), its
plot, and ``docs/results/NAME/results.json`` (with a ``probe`` section).
"""

from __future__ import annotations

from opd.diagnostics.diagnose import probe_depths
from opd.diagnostics.orders import order_depth

import probed  # experiments/probed.py


def measure(cfg, setup, problems, seed: int) -> dict[int, dict]:
    env = setup.env
    kw = dict(eos_id=env.eos_id, pad_id=env.pad_id, max_new_tokens=env.max_new_tokens, encode_prompt=env.encode_prompt)
    return {k: order_depth(env.student, setup.tokenizer, problems, k, env.verify, **kw) for k in probe_depths(cfg.horizon)}


PROBE = probed.Probe(
    measure=measure,
    keys=("p_swap", "swap_onset", "swap_finish", "swap_recovery", "clean_recovery"),
    judged=("p_swap", "swap_onset", "swap_recovery"),
    names={"p_swap": "P(other order)", "swap_onset": "opens the other order", "swap_finish": "finishes it",
           "swap_recovery": "recovery, other order", "clean_recovery": "recovery, reference order"},
    title="Order probe",
    intro="Of {n} held-out test problems, those whose step k has two different operand digits (their count per "
          "depth, `n`, is in results.json), cut before step k (the reference's first k - 1 steps, written a b). "
          "P(other order): the student's probability of opening step k with b_k; opens the other order: its greedy "
          "first word is b_k; finishes it: after b_k its greedy next word is a_k; recovery: the completion from the "
          "prefix and b_k (other order) or a_k (reference order) verifies. Mean ± std over the reported seeds. The "
          "verdicts above on `probe/*` take each run's mean over depths.",
    small=("p_swap",),
)

if __name__ == "__main__":
    probed.main("eopd_orders_tune2", PROBE, __doc__)
