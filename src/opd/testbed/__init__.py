"""The synthetic testbed: exactly verifiable tasks whose chain of thought has a set length
(:mod:`~opd.testbed.addition`, :mod:`~opd.testbed.modchain`), their word-level tokenizer,
the programmable oracle teacher (:mod:`~opd.testbed.oracle`) and the builder of the tiny
student and teacher models (:mod:`~opd.testbed.builder`)."""
