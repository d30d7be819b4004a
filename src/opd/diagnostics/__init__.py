"""Pitfall measurements (METHODS.md, "What the pitfalls look like, to measure them").

- :mod:`opd.run.step_diagnostics`: cheap per-step statistics the training loop logs on every
  step for every method, under ``diag/...``: student entropy, teacher–student top-K
  overlap, retained teacher top-K mass, teacher argmax disagreement with the sampled
  token, teacher log-likelihood of the student's tokens by completion position (coverage
  decay), and the rollout repetition rate. Pure tensor functions (torch, ``opd.losses``
  and ``opd.signals.monitors`` only): no models, no config, so the algorithm-blind loop
  can call them without knowing the method.

``opd diagnose`` (:mod:`opd.diagnostics.diagnose`, the only module here that reads a
config) measures the pitfalls on a checkpoint with :mod:`~opd.diagnostics.coverage`
(teacher log-likelihood, entropy, top-K overlap by position, student vs teacher
rollouts), :mod:`~opd.diagnostics.noise` (teacher entropy on student prefixes; its argmax
after a wrong step), :mod:`~opd.diagnostics.variance` (gradient variance of the per-token
and reward-to-go estimators vs horizon) and :mod:`~opd.diagnostics.probe` (planted wrong
steps), and :mod:`~opd.diagnostics.report` writes the Markdown and PNGs.

This package imports nothing at load time, so ``opd.run.loop`` importing
``opd.run.step_diagnostics`` pulls in no reporting or plotting code.
"""
