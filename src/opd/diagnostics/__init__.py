"""Pitfall measurements (METHODS.md, "What the pitfalls look like, to measure them").

The cheap per-step statistics the training loop logs on every step (``diag/...``) live
with the loop, in :mod:`opd.run.step_diagnostics`.

``opd diagnose`` (:mod:`opd.diagnostics.diagnose`, the only module here that reads a
config) measures the pitfalls on a checkpoint with :mod:`~opd.diagnostics.coverage`
(teacher log-likelihood, entropy, top-K overlap by position, student vs teacher
rollouts), :mod:`~opd.diagnostics.noise` (teacher entropy on student prefixes; its argmax
after a wrong step), :mod:`~opd.diagnostics.variance` (gradient variance of the per-token
and reward-to-go estimators vs horizon) and :mod:`~opd.diagnostics.probe` (planted wrong
steps), and :mod:`~opd.diagnostics.report` writes the Markdown and PNGs.
"""
