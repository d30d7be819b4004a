"""A method in one place, and named sources: what the registries promise.

- A method's knobs are declared once, in its builder's signature; the run config learns
  them (type, default, range, help) from the registry. A test-only method added to a copy
  of the registry gets its config key, its range check, and is built from the config.
- ``task=``, ``student=``, ``teacher=`` names resolve through :mod:`opd.run.sources`,
  which the testbed fills; a plug-in can register its own names.
"""

from __future__ import annotations

from typing import Annotated

import pytest

from opd.config.loader import ConfigError, load_config
from opd.config.train import TrainConfig, make_train_config
from opd.errors import UserError
from opd.methods import METHODS, build_method, knob_fields, method_knobs
from opd.methods.base import method_info
from opd.methods.knobs import Gamma, knob
from opd.methods.opd import build as build_opd


@method_info(paper="test only", fixes="nothing", source="test", recipe={})
def build_echo(echo_scale: Annotated[float, knob("scale of the echoed advantage", gt=0)] = 2.0, gamma: Gamma = 0.0):
    """A trivial method: OPD with its own knob (what adding a method takes)."""
    return build_opd(gamma=gamma, kl_coef=echo_scale)


def _with_echo() -> dict:
    return {**METHODS, "echo": build_echo}


def test_a_new_method_gets_its_config_key_range_and_help():
    cfg_cls = make_train_config(_with_echo())
    field = cfg_cls.model_fields["echo_scale"]
    assert field.default == 2.0 and field.description == "echo: scale of the echoed advantage"
    cfg = load_config(cfg_cls, None, ["method=echo", "echo_scale=0.5"])
    assert cfg.method == "echo" and cfg.echo_scale == 0.5
    with pytest.raises(ConfigError, match=r"config key 'echo_scale' must be > 0"):
        load_config(cfg_cls, None, ["method=echo", "echo_scale=0"])
    method = build_method("echo", cfg.model_dump(), _with_echo())
    assert method.name == "opd" and method.signal is not None


def test_shared_knob_help_names_every_method_that_takes_it():
    fields = knob_fields(_with_echo())
    owners = fields["gamma"][1].description.split(":")[0].split(", ")
    assert "opd" in owners and "echo" in owners and "grpo" not in owners


def test_the_real_config_has_every_knob_with_its_builder_default():
    for name in METHODS:
        for key, default in method_knobs(name).items():
            assert TrainConfig.model_fields[key].default == default, (name, key)


def test_method_name_comes_from_the_registry():
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(TrainConfig, None, ["method=echo"])
    assert load_config(make_train_config(_with_echo()), None, ["method=echo"]).method == "echo"


def test_a_knob_declared_two_ways_is_refused():
    @method_info(paper="t", fixes="t", source="t", recipe={})
    def build_bad(gamma: Annotated[float, knob("another gamma")] = 0.5):
        return build_opd()

    with pytest.raises(TypeError, match="knob 'gamma' is declared differently"):
        make_train_config({**METHODS, "bad": build_bad})


def test_a_builder_parameter_must_be_a_knob_or_a_run_setting():
    @method_info(paper="t", fixes="t", source="t", recipe={})
    def build_bad(mystery: float = 1.0):
        return build_opd()

    with pytest.raises(TypeError, match=r"\['mystery'\] are neither knobs"):
        make_train_config({**METHODS, "bad": build_bad})


def test_builders_validate_their_knobs_when_called_from_code():
    with pytest.raises(ValueError, match="tip_rho"):
        build_method("tip", {"tip_rho": 1.5})
    with pytest.raises(ValueError, match="echo_scale"):
        build_echo(echo_scale=-1.0)
    assert build_method("trunc", {"trunc_tokens": 6, "max_new_tokens": 40}).name == "trunc"


# ------------------------------------------------------------------- named sources


def test_unknown_task_is_refused_with_the_known_ones(tiny_cfg):
    from opd.run.setup import build_setup

    with pytest.raises(UserError, match=r"unknown task 'addtion'; known tasks: addition, addition_mixed, addition_swapped, modchain"):
        build_setup(tiny_cfg(task="addtion"))


def test_the_testbed_registers_its_names():
    from opd.run import sources

    assert {"addition", "addition_swapped", "modchain", "ring"} <= set(sources.names("task"))
    assert sorted(sources.names("student")) == ["testbed", "testbed-d128", "testbed-d128x4", "testbed-d32", "testbed-d64",
                                                "testbed-wait", "testbed-x4"]
    assert {"oracle", "testbed", "testbed-swapped"} <= set(sources.names("teacher"))
    assert sources.lookup("teacher", "/some/model/dir") is None


def test_the_capacity_students_are_built_from_scratch_at_their_size(monkeypatch, tmp_path):
    from opd.run import sources
    from opd.testbed import builder

    made = []
    monkeypatch.setattr(builder, "_prepare", lambda kind, task, horizon, arch, training, seed, quiet: made.append(
        (kind, task, horizon, arch["hidden_size"], arch["num_hidden_layers"], training)) or tmp_path)
    for name in ("testbed-d32", "testbed-d64", "testbed-d128", "testbed-d128x4"):
        assert sources.lookup("student", name)({"task": "modchain", "horizon": 8}) == tmp_path
    assert [m[:5] for m in made] == [("student-d32", "modchain", 8, 32, 1), ("student-d64", "modchain", 8, 64, 1),
                                     ("student-d128", "modchain", 8, 128, 2), ("student-d128x4", "modchain", 8, 128, 4)]
    assert all(m[5] == builder.CAPACITY_TRAINING for m in made)  # SFT only: no damage step


def test_a_registered_teacher_name_is_used_by_the_run(tiny_cfg, monkeypatch):
    from opd.run import sources
    from opd.run.setup import build_setup
    from opd.testbed.oracle import OracleTeacher

    made = []

    def sharp_oracle(settings, task, tokenizer):
        made.append(settings["oracle_sharpness"])
        return OracleTeacher(task, tokenizer, sharpness=20.0)

    monkeypatch.setitem(sources._SOURCES["teacher"], "sharp", sharp_oracle)
    setup = build_setup(tiny_cfg(teacher="sharp"))
    assert made == [8.0] and isinstance(setup.env.teacher, OracleTeacher)


def test_a_registered_name_can_be_a_model_path(tiny_cfg, tiny_student_dir, monkeypatch):
    from opd.models.hf import HFTeacher
    from opd.run import sources
    from opd.run.setup import build_setup

    monkeypatch.setitem(sources._SOURCES["teacher"], "same", lambda settings, task, tok: tiny_student_dir)
    assert isinstance(build_setup(tiny_cfg(teacher="same")).env.teacher, HFTeacher)


def test_register_refuses_an_unknown_kind():
    from opd.run.sources import register

    with pytest.raises(ValueError, match="unknown source kind 'model'"):
        register("model", "x", lambda: None)
