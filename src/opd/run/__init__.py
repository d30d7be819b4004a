"""The run around the algorithm-blind loop: set-up from the config, the step loop
(:mod:`~opd.run.loop`), evaluation, checkpoints, the metrics log, the per-step pitfall
statistics, and the registry of named model and task sources (:mod:`~opd.run.sources`).

This is where device handling and distributed training live. Nothing here imports the
testbed: ``student=testbed`` and ``teacher=oracle`` are names that the testbed registers.
"""
