"""opd.config.loader: precedence, type parsing, every error path, save/load round trip."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from opd.config.loader import ConfigError, config_to_dict, describe_config, load_config, save_config


@dataclass
class Cfg:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    steps: int = 100
    method: Literal["sft", "grpo", "gkd"] = "sft"
    loss: Optional[Literal["rkl", "fkl"]] = None
    run_name: str | None = None
    seed: int | None = None
    clip: float | None = None
    tag: str = "base"
    bf16: bool = False
    layers: list[int] = field(default_factory=lambda: [1, 2])
    weights: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=lambda: ["a"])
    max_new_tokens: int = 64

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class NoneChoice:
    scale: Literal["std", "none"] = "std"


def test_none_as_a_literal_choice(tmp_path):
    assert load_config(NoneChoice, overrides=["scale=none"]).scale == "none"
    assert load_config(NoneChoice, write(tmp_path, "scale: none\n")).scale == "none"
    path = tmp_path / "saved.yaml"
    save_config(NoneChoice("none"), path)
    assert load_config(NoneChoice, path) == NoneChoice("none")


@dataclass
class Required:
    model: str
    lr: float = 1e-3


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ precedence


def test_defaults():
    assert load_config(Cfg) == Cfg()


def test_precedence_defaults_base_yaml_overrides(tmp_path):
    path = write(tmp_path, "lr: 0.01\nsteps: 7\ntag: yaml\n")
    base = {"lr": 0.5, "steps": 3, "bf16": True, "tag": "preset"}
    cfg = load_config(Cfg, path, ["tag=cli", "tag=cli2"], base=base)
    assert cfg.bf16 is True  # base only
    assert cfg.steps == 7 and cfg.lr == 0.01  # yaml over base
    assert cfg.tag == "cli2"  # later override wins
    assert cfg.method == "sft"  # default


def test_empty_yaml_is_empty_mapping(tmp_path):
    assert load_config(Cfg, write(tmp_path, "# nothing\n")) == Cfg()


# ------------------------------------------------------------------ type parsing


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("FALSE", False), ("Yes", True), ("no", False), ("1", True), ("0", False)],
)
def test_bool_words(text, expected):
    assert load_config(Cfg, overrides=[f"bf16={text}"]).bf16 is expected


@pytest.mark.parametrize("text, expected", [("12", 12), ("1e3", 1000), ("1_000", 1000), ("2.0", 2)])
def test_int_parsing(text, expected):
    steps = load_config(Cfg, overrides=[f"steps={text}"]).steps
    assert steps == expected and type(steps) is int


@pytest.mark.parametrize(
    "text, expected", [("3e-4", 3e-4), ("2", 2.0), (" 0.5 ", 0.5), ("inf", math.inf)]
)
def test_float_parsing(text, expected):
    lr = load_config(Cfg, overrides=[f"lr={text}"]).lr
    assert lr == expected and type(lr) is float


def test_float_from_yaml_string_and_int(tmp_path):
    # PyYAML reads 3e-4 (no dot) as a string and 2 as an int; both must become floats.
    cfg = load_config(Cfg, write(tmp_path, "lr: 3e-4\nclip: 2\n"))
    assert cfg.lr == 3e-4 and type(cfg.clip) is float and cfg.clip == 2.0


def test_optional_none_words():
    cfg = load_config(
        Cfg,
        overrides=["run_name=a", "run_name=None", "seed=null", "clip=NONE", "loss=none"],
    )
    assert cfg.run_name is None and cfg.seed is None and cfg.clip is None and cfg.loss is None
    cfg = load_config(Cfg, overrides=["seed=5", "clip=0.5", "loss=fkl", "run_name=x"])
    assert (cfg.seed, cfg.clip, cfg.loss, cfg.run_name) == (5, 0.5, "fkl", "x")


def test_yaml_null_and_quoted_none(tmp_path):
    cfg = load_config(Cfg, write(tmp_path, "seed: null\nrun_name: 'none'\nclip: ~\nloss: None\n"))
    assert cfg.seed is None and cfg.clip is None and cfg.loss is None
    assert cfg.run_name == "none"  # a quoted YAML string stays text for a str field
    assert load_config(Cfg, write(tmp_path, "run_name: none\n")).run_name is None
    assert load_config(Cfg, write(tmp_path, "tag: none\n")).tag == "none"  # not optional


def test_literal():
    assert load_config(Cfg, overrides=["method=grpo"]).method == "grpo"


@pytest.mark.parametrize(
    "text, expected",
    [("3,4,5", [3, 4, 5]), ("[3, 4]", [3, 4]), ("7", [7]), ("", []), ("[]", []), (" 1 ,2", [1, 2])],
)
def test_int_list(text, expected):
    assert load_config(Cfg, overrides=[f"layers={text}"]).layers == expected


def test_float_and_str_lists(tmp_path):
    cfg = load_config(Cfg, overrides=["weights=0.5,1e-3", "names=[x, 'y,z']"])
    assert cfg.weights == [0.5, 1e-3] and cfg.names == ["x", "y,z"]
    cfg = load_config(Cfg, write(tmp_path, "layers: [1, 2, 3]\nweights: [3e-4]\nnames: a,b\n"))
    assert cfg.layers == [1, 2, 3] and cfg.weights == [3e-4] and cfg.names == ["a", "b"]
    cfg = load_config(Cfg, write(tmp_path, "names: [none, x]\n"))
    assert cfg.names == ["none", "x"] and type(cfg.names[0]) is str


def test_str_override_keeps_equals_and_text():
    assert load_config(Cfg, overrides=["tag=a=b"]).tag == "a=b"
    assert load_config(Cfg, overrides=["tag=none"]).tag == "none"  # not Optional: text


# ------------------------------------------------------------------ errors


def test_unknown_key_suggests_and_lists_keys():
    msg = error(Cfg, overrides=["lr_rate=3"])
    assert "unknown config key 'lr_rate'" in msg
    assert "did you mean 'lr'?" in msg
    assert "known keys:" in msg and "max_new_tokens" in msg and "method" in msg


def test_unknown_key_close_typo_and_dashes():
    assert "did you mean 'max_new_tokens'" in error(Cfg, overrides=["max_new_token=3"])
    msg = error(Cfg, overrides=["--steps=3"])
    assert "did you mean 'steps'" in msg and "without dashes" in msg
    assert "flat" in error(Cfg, overrides=["optim.lr=3"])


def test_unknown_key_without_suggestion():
    msg = error(Cfg, overrides=["zzzz=1"])
    assert "'zzzz'" in msg and "did you mean" not in msg and "known keys:" in msg


def test_unknown_key_in_yaml_and_base(tmp_path):
    path = write(tmp_path, "stepz: 3\n")
    msg = error(Cfg, path)
    assert "'stepz'" in msg and "'steps'" in msg and str(path) in msg
    assert "'bogus'" in error(Cfg, base={"bogus": 1})


@pytest.mark.parametrize(
    "override, expect",
    [
        ("lr=abc", "config key 'lr' expects a float, got 'abc'"),
        ("steps=1.5", "config key 'steps' expects an int, got '1.5' (not a whole number)"),
        ("steps=1e-3", "config key 'steps' expects an int"),
        ("steps=ten", "config key 'steps' expects an int, got 'ten'"),
        ("steps=none", "config key 'steps' expects an int, got 'none'"),
        ("bf16=maybe", "config key 'bf16' expects a bool (true/false/yes/no/1/0), got 'maybe'"),
        ("seed=x", "config key 'seed' expects an int or none, got 'x'"),
        ("layers=1,a", "config key 'layers' expects a list of int"),
        ("layers=[1, 2", "config key 'layers' expects a list of int"),
        ("names=[yes]", "config key 'names' expects a list of str"),
    ],
)
def test_bad_values(override, expect):
    msg = error(Cfg, overrides=[override])
    assert expect in msg and override in msg


def test_bad_list_item_is_named():
    msg = error(Cfg, overrides=["layers=1,a"])
    assert "item 1 is 'a', not an int" in msg


def test_literal_error_lists_choices():
    msg = error(Cfg, overrides=["method=xyz"])
    assert "config key 'method' must be one of 'sft', 'grpo', 'gkd', got 'xyz'" in msg
    msg = error(Cfg, overrides=["loss=jsd"])
    assert "config key 'loss' must be one of 'rkl', 'fkl', or none, got 'jsd'" in msg


@pytest.mark.parametrize("text", ["lr", "=3", "", " =x"])
def test_malformed_override(text):
    msg = error(Cfg, overrides=[text])
    assert "malformed override" in msg and "key=value" in msg


def test_yaml_type_errors(tmp_path):
    msg = error(Cfg, write(tmp_path, "tag: 12\n"))
    assert "config key 'tag' expects a string, got 12" in msg and "quote it" in msg
    msg = error(Cfg, write(tmp_path, "bf16: maybe\n"))
    assert "config key 'bf16' expects a bool" in msg
    msg = error(Cfg, write(tmp_path, "steps: null\n"))
    assert "config key 'steps' expects an int, got None (this key is not optional)" in msg
    assert "config key 'steps'" in error(Cfg, write(tmp_path, "steps: true\n"))


def test_yaml_not_a_mapping(tmp_path):
    msg = error(Cfg, write(tmp_path, "- lr\n- steps\n"))
    assert "must be a flat mapping" in msg and "list" in msg
    assert "must be a flat mapping" in error(Cfg, write(tmp_path, "just text\n"))


def test_yaml_nested_key(tmp_path):
    msg = error(Cfg, write(tmp_path, "lr:\n  value: 3\n"))
    assert "config key 'lr' has a nested mapping" in msg and "flat" in msg
    assert "'optim'" in error(Cfg, write(tmp_path, "optim:\n  lr: 3\n"))


def test_yaml_duplicate_key(tmp_path):
    path = write(tmp_path, "lr: 0.1\nsteps: 3\nlr: 0.2\n")
    msg = error(Cfg, path)
    assert "duplicate config key 'lr'" in msg and "line 3" in msg and str(path) in msg


def test_yaml_syntax_error(tmp_path):
    msg = error(Cfg, write(tmp_path, "lr: [1, 2\n"))
    assert "not valid YAML" in msg


def test_missing_file(tmp_path):
    msg = error(Cfg, tmp_path / "nope.yaml")
    assert "not found" in msg and "nope.yaml" in msg


def test_post_init_error_is_config_error():
    msg = error(Cfg, overrides=["lr=-1"])
    assert "invalid config" in msg and "lr must be positive" in msg


def test_required_field():
    msg = error(Required)
    assert "config key 'model' is required" in msg and "model=" in msg
    assert load_config(Required, overrides=["model=gpt2"]).model == "gpt2"


def test_not_a_dataclass_or_unsupported_type():
    with pytest.raises(TypeError, match="dataclass"):
        load_config(dict)

    @dataclass
    class Bad:
        x: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="'x'"):
        load_config(Bad)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------ output


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        Cfg,
        overrides=[
            "lr=1e-10",
            "steps=123456789",
            "method=gkd",
            "loss=rkl",
            "run_name=none",
            "tag=3e-4",  # a string that looks like a number
            "bf16=yes",
            "layers=",
            "weights=0.1,1e20,-2.5",
            "names=['true', 'null', 'none', 'a: b', '']",
        ],
    )
    assert cfg.names == ["true", "null", "none", "a: b", ""] and cfg.tag == "3e-4"
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(Cfg, path) == cfg
    cfg2 = Cfg(run_name="none", tag="null", seed=0, clip=0.0)  # text that YAML could misread
    save_config(cfg2, path)
    assert load_config(Cfg, path) == cfg2


def test_config_to_dict():
    d = config_to_dict(Cfg())
    assert d["lr"] == 3e-4 and d["layers"] == [1, 2] and list(d)[0] == "lr"
    with pytest.raises(TypeError):
        config_to_dict(Cfg)


def test_describe_config():
    text = describe_config(Cfg)
    lines = text.splitlines()
    assert lines[0].split() == ["key", "type", "default", "help"]
    lr_line = next(line for line in lines if line.startswith("lr "))
    assert "float" in lr_line and "0.0003" in lr_line and "peak learning rate" in lr_line
    assert "'sft'|'grpo'|'gkd'" in text and "int | None" in text and "list[int]" in text
    assert "(required)" in describe_config(Required)


def test_method_recipe_applies_under_the_users_settings(tmp_path):
    from opd.config.train import train_config

    cfg, recipe = train_config(None, ["method=scope"])
    assert (cfg.group_size, cfg.temperature) == (8, 0.6) and recipe == {"group_size": 8, "temperature": 0.6}
    cfg, _ = train_config(None, ["method=scope", "group_size=3"])
    assert (cfg.group_size, cfg.temperature) == (3, 0.6)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("method: scope\ntemperature: 1.0\n")
    cfg, _ = train_config(str(yaml_file), [])
    assert (cfg.group_size, cfg.temperature) == (8, 1.0)
    cfg, recipe = train_config(None, ["method=sft"])
    assert recipe == {} and cfg.temperature == 1.0
