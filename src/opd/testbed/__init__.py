"""The synthetic testbed: exactly verifiable tasks whose chain of thought has a set length
(:mod:`~opd.testbed.addition`, :mod:`~opd.testbed.modchain`), their word-level tokenizer,
the programmable oracle teacher (:mod:`~opd.testbed.oracle`) and the builder of the tiny
student and teacher models (:mod:`~opd.testbed.builder`).

Importing this package registers its names with the run (:mod:`opd.run.sources`): the
tasks by name, ``student=testbed`` (the prepared student base: converged, then damaged),
``student=testbed-d32`` / ``-d64`` / ``-d128`` / ``-d128x4`` (students of four capacities trained from
scratch by SFT, not damaged: :data:`opd.testbed.builder.CAPACITY_ARCHS`), ``teacher=testbed`` (the
learned teacher; ``teacher=testbed-swapped``: the same, trained on solutions written in another
style) and ``teacher=oracle``. The run never imports the testbed; the testbed builds its models
with the run.
"""

from __future__ import annotations

from opd.errors import UserError
from opd.run.sources import register
from opd.testbed.tasks import TASKS, make_task


def _recipe(settings: dict) -> dict:
    """The arguments every student base is built from: the run's task and horizon, and its
    ``base_seed`` (0: the bases shipped with ``opd``)."""
    return {"task": settings["task"], "horizon": settings["horizon"], "seed": settings.get("base_seed", 0)}


def _student_base(settings: dict):
    from opd.testbed.builder import prepare_student_base

    return prepare_student_base(**_recipe(settings))


def _deep_base(settings: dict):
    from opd.testbed.builder import DEEP_LAYERS, prepare_student_base

    return prepare_student_base(**_recipe(settings), layers=DEEP_LAYERS)


def _wait_base(settings: dict):
    from opd.testbed.builder import WAIT_CORRECTIONS, prepare_student_base

    return prepare_student_base(**_recipe(settings), correction_rate=WAIT_CORRECTIONS)


def _capacity_student(capacity: str):
    def source(settings: dict):
        from opd.testbed.builder import prepare_capacity_student

        return prepare_capacity_student(capacity, **_recipe(settings))

    return source


def _learned_teacher(settings: dict, task, tokenizer):
    from opd.testbed.builder import prepare_teacher

    return prepare_teacher(settings["task"], settings["horizon"])


def _swapped_teacher(settings: dict, task, tokenizer):
    from opd.testbed.builder import prepare_teacher

    return prepare_teacher(settings["task"], settings["horizon"], style="swapped")


def _oracle(settings: dict, task, tokenizer):
    if settings.get("dataset"):
        raise UserError("teacher=oracle only knows the synthetic testbed tasks; with dataset=... give a model path.")
    from opd.testbed.oracle import OracleTeacher

    return OracleTeacher(
        task, tokenizer, sharpness=settings["oracle_sharpness"], noise=settings["oracle_noise"],
        decay=settings["oracle_decay"], decay_mode=settings["oracle_decay_mode"], recovers=settings["oracle_recovers"],
        blind_spot=settings.get("oracle_blind_spot", 0), recover_prob=settings.get("oracle_recover_prob", 1.0),
        noise_kind=settings.get("oracle_noise_kind", "uniform"), two_orders=settings.get("oracle_two_orders", False),
        noise_legal_only=settings.get("oracle_noise_legal_only", False),
    )


for _name in TASKS:
    register("task", _name, lambda horizon, _name=_name: make_task(_name, horizon))
register("student", "testbed", _student_base)
register("student", "testbed-wait", _wait_base)  # the base, its SFT with 5% corrected solutions
register("student", "testbed-x4", _deep_base)  # the base with 4 layers (long chains)
for _capacity in ("d32", "d64", "d128", "d128x4"):  # from scratch, not damaged (d32-d128: smaller than the teacher)
    register("student", f"testbed-{_capacity}", _capacity_student(_capacity))
register("teacher", "testbed", _learned_teacher)
register("teacher", "testbed-swapped", _swapped_teacher)  # the learned teacher, writing each step's operands b a
register("teacher", "oracle", _oracle)
