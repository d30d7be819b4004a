"""DAgger's question on the ring walk: after a wrong move, does the trained student turn back?

    python experiments/detour.py NAME [--out runs/NAME] [--jobs N] [--probe-prompts 128] [--set KEY=VALUE ...]

Runs a ring experiment (``experiments/NAME.yaml``: ``ring``, ``ring_d128``) with
``opd compare`` under the protocol (finished runs are reused), then the detour probe of
``opd diagnose`` (:mod:`opd.diagnostics.detour`) on the student before training and on every
reported seed's final checkpoint: held-out walks cut after move k - 1, then the other move
(k = 1, h/2, h). Per run and depth: how often the greedy continuation turns back (its first
move is the best one), how often the whole walk then verifies, how often it answers before
reaching the target (counting moves), and the walk's accuracy without the detour. The first
three, each the mean over depths, get verdicts by the same rule as accuracy. Writes ``docs/results/NAME.md`` (with a detour section), its plot, and
``docs/results/NAME/results.json`` (with a ``probe`` section).
"""

from __future__ import annotations

from opd.diagnostics.diagnose import detour_section

import probed  # experiments/probed.py


def measure(cfg, setup, problems, seed: int) -> dict[int, dict]:
    return detour_section(cfg, setup.env, setup.tokenizer, problems)["depths"]


PROBE = probed.Probe(
    measure=measure,
    keys=("back", "recovery", "stops_short", "clean_recovery"),
    judged=("back", "recovery", "stops_short"),
    names={"back": "turns back", "recovery": "recovery", "stops_short": "stops short", "clean_recovery": "recovery, no detour"},
    title="Detour probe",
    intro="{n} held-out test walks per depth k, cut after move k - 1, then the other move (a legal action, its state "
          "written right); greedy continuations. Turns back: the first move is the best one from there; recovery: the "
          "whole walk verifies (h + 2 moves allowed); stops short: it answers before it reaches the target, every state "
          "written right (it counts moves instead of looking at the state). Mean ± std over the reported seeds. The verdicts above on "
          "`probe/*` take each run's mean over depths.",
)

if __name__ == "__main__":
    probed.main(None, PROBE, __doc__)
