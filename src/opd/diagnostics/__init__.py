"""Pitfall measurements (METHODS.md, "What the pitfalls look like, to measure them").

- :mod:`opd.diagnostics.step`: cheap per-step statistics the training loop logs on every
  step for every method, under ``diag/...``: student entropy, teacher–student top-K
  overlap, retained teacher top-K mass, teacher argmax disagreement with the sampled
  token, teacher log-likelihood of the student's tokens by completion position (coverage
  decay), and the rollout repetition rate. Pure tensor functions (torch, ``opd.losses``
  and ``opd.signals.monitors`` only): no models, no config, so the algorithm-blind loop
  can call them without knowing the method.

This package imports nothing at load time, so ``opd.train`` importing
``opd.diagnostics.step`` pulls in no reporting or plotting code.
"""
