"""Myopic supervision on the testbed: does per-token OPD teach recovery from a wrong step?

    python experiments/myopic.py [NAME] [--out runs/NAME] [--jobs N] [--probe-prompts 128] [--set KEY=VALUE ...]

Runs ``experiments/NAME.yaml`` (default ``myopic``) with ``opd compare`` under the protocol, then the
correction-path probe of ``opd diagnose`` on the base and on every reported seed's final
checkpoint: held-out reference solutions cut after step k, step k's result replaced by a
wrong digit (k = 1, 2, 4). Per run and depth: the student's P(`wait`) there, how often its
greedy continuation starts with `wait` (onset), how often it then redoes the step exactly,
how often it still reaches the right answer, and how often it says `wait` after a correct
step (false alarm). The probe's metrics, each the mean over depths, get verdicts by the
same rule as accuracy. Writes ``docs/results/NAME.md``, its plot, and
``docs/results/NAME/results.json`` (with a ``probe`` section).
"""

from __future__ import annotations

import torch

from opd.diagnostics.diagnose import probe_section

import probed  # experiments/probed.py


def measure(cfg, setup, problems, seed: int) -> dict[int, dict]:
    generator = torch.Generator().manual_seed(seed)
    return probe_section(cfg, setup.env, setup.tokenizer, problems, generator)["depths"]


PROBE = probed.Probe(
    measure=measure,
    keys=("p_wait", "onset", "wait_redo", "redo_given_wait", "recovery", "clean_recovery", "false_wait", "false_onset"),
    judged=("onset", "wait_redo", "recovery", "false_onset"),
    names={"p_wait": "P(wait)", "onset": "onset", "wait_redo": "wait + right redo", "redo_given_wait": "P(right redo | wait)",
           "recovery": "recovery", "clean_recovery": "recovery, clean prefix", "false_wait": "P(wait), clean prefix",
           "false_onset": "false onset"},
    title="Correction probe",
    intro="{n} held-out test problems per depth k, step k's result replaced by a plausible wrong digit; greedy "
          "continuations. Mean ± std over the reported seeds. The verdicts above on `probe/*` take each run's mean over "
          "depths. `false onset` and `P(wait), clean prefix` are false alarms: lower is better.",
    small=("p_wait", "false_wait"),
)

if __name__ == "__main__":
    probed.main("myopic", PROBE, __doc__)
