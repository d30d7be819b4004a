"""Where each label's student puts its argmax and its mass on the reference solution: the
probe behind greedy-only gains (``experiments/greedy_vs_sampled.py``).

    python experiments/reference_fit.py NAME [--out runs/NAME] [--jobs N] [--probe-prompts 500]

(500 held-out problems by default: the evaluation's test prompts.)

Runs ``experiments/NAME.yaml`` with ``opd compare`` under the protocol (finished runs are
reused), then a teacher-forced pass over the reference solutions of held-out test problems
(:mod:`opd.diagnostics.reference_fit`) on the base and on every reported seed's final
checkpoint, the solution cut into quarters k = 1..4. Per run and quarter: the mean
probability of the reference token (``p_ref``), the share of its tokens that are the argmax
(``argmax_ref``), the student's entropy, and, through the end of the quarter, the share of
problems whose argmax follows the reference (``follow``: greedy decoding writes it) and the
mean probability of sampling it (``p_follow``). The last quarter's ``follow`` and ``p_follow``
are teacher-forced stand-ins for greedy accuracy and pass@1 on the one reference path. The
verdicts on ``probe/*`` take each run's mean over quarters. Writes ``docs/results/NAME.md``,
its plot, and ``docs/results/NAME/results.json`` (with a ``probe`` section).
"""

from __future__ import annotations

from opd.diagnostics.reference_fit import reference_fit

import probed  # experiments/probed.py


def measure(cfg, setup, problems, seed: int) -> dict[int, dict]:
    prompts = [setup.env.encode_prompt(p) for p in problems]
    solutions = [setup.tokenizer(p.solution, add_special_tokens=False)["input_ids"] for p in problems]
    return reference_fit(setup.env.student, prompts, solutions, setup.env.pad_id)


PROBE = probed.Probe(
    measure=measure,
    keys=("p_ref", "argmax_ref", "entropy", "follow", "p_follow"),
    judged=("p_ref", "argmax_ref", "entropy", "follow", "p_follow"),
    names={"p_ref": "P(reference token)", "argmax_ref": "argmax = reference", "entropy": "entropy (nats)",
           "follow": "argmax follows the reference so far", "p_follow": "P(sampling the reference so far)"},
    title="Reference-fit probe",
    intro="{n} held-out test problems; each reference solution fed to the student, cut into quarters k = 1..4 of its "
          "tokens. The first three columns are means over the quarter's tokens; the last two run from the start of the "
          "solution to the end of quarter k (k = 4: the whole solution). Mean ± std over the reported seeds. The "
          "verdicts above on `probe/*` take each run's mean over the quarters.",
    prompts=500,
)

if __name__ == "__main__":
    probed.main(None, PROBE, __doc__)
