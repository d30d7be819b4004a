"""Testbed bases shipped with opd: copied into the cache on a miss, verified, never stale."""

import hashlib
import json

import pytest

from opd.errors import UserError
from opd.testbed import builder, shipped

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_recipe(monkeypatch):
    monkeypatch.setattr(builder, "STUDENT_ARCH", TINY)
    monkeypatch.setattr(builder, "STUDENT_WARMUP", dict(steps=2, lr=1e-3, prompts_per_step=4, stop_at_accuracy=None))
    monkeypatch.setattr(builder, "DAMAGE_GRID", (0.01, 1.0))


@pytest.fixture
def shipped_tiny(tiny_recipe, tmp_path, monkeypatch):
    """The tiny recipe's clean and damaged bases built in one cache and shipped to a fake root."""
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "build_cache"))
    monkeypatch.setenv("OPD_SHIPPED_BASES", "0")
    root = tmp_path / "bases"
    built = [builder.prepare_student_base("addition", 2, quiet=True, target_accuracy=t) for t in (None, 0.0)]
    for folder in built:
        shipped.ship(folder, root)
    monkeypatch.setattr(shipped, "ROOT", root)
    monkeypatch.setenv("OPD_SHIPPED_BASES", "1")
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "user_cache"))
    return root, built


def _no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("built a base that ships")

    monkeypatch.setattr(builder, "_sft", refuse)
    monkeypatch.setattr(builder, "_build_damaged", refuse)


def test_a_shipped_base_is_copied_into_the_cache_verified_and_not_built(shipped_tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    root, built = shipped_tiny
    _no_build(monkeypatch)
    path = builder.prepare_student_base("addition", 2, quiet=True, target_accuracy=0.0)
    assert path.parent == tmp_path / "user_cache" / "testbed" and path.name == built[1].name
    clean = path.with_name(built[0].name)
    for folder, source in ((clean, built[0]), (path, built[1])):
        names = json.loads((root / shipped.SUMS).read_text())[folder.name]
        assert "model.safetensors" in names and "READY.json" in names and "trainer_state.pt" not in names
        for name in names:
            assert _sha(folder / name) == _sha(source / name)
    assert json.loads((path / "READY.json").read_text())["damage"] == 0.01
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.hidden_size == TINY["hidden_size"]
    assert not list(path.parent.glob("*.shipped"))
    assert builder.student_base_path("addition", 2, target_accuracy=0.0) == path  # the path, nothing built


def test_a_tampered_shipped_file_is_refused_with_the_fix_named_and_nothing_cached(shipped_tiny, monkeypatch):
    root, built = shipped_tiny
    _no_build(monkeypatch)
    weights = root / built[0].name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(UserError, match="model.safetensors is missing or does not match its sha256.*OPD_SHIPPED_BASES=0"):
        builder.prepare_student_base("addition", 2, quiet=True, target_accuracy=0.0)
    cache = builder.student_base_path("addition", 2, target_accuracy=None).parent
    assert not any(p.is_dir() for p in cache.iterdir())  # no half-copied base, no leftover work folder


def test_shipping_off_builds_the_base_instead(shipped_tiny, monkeypatch):
    monkeypatch.setenv("OPD_SHIPPED_BASES", "0")
    calls = []
    real_sft = builder._sft
    monkeypatch.setattr(builder, "_sft", lambda *a: calls.append(a) or real_sft(*a))
    builder.prepare_student_base("addition", 2, quiet=True, target_accuracy=None)
    assert len(calls) == 1


def test_opd_prepare_build_turns_shipping_off(monkeypatch):
    from opd import cli

    seen = []
    monkeypatch.setenv("OPD_SHIPPED_BASES", "1")
    monkeypatch.setattr(builder, "prepare", lambda task, horizon, teacher=False, **kw: seen.append(shipped.enabled()) or "path")
    assert cli.main(["prepare", "--build", "--horizon", "2"]) == 0
    assert seen == [False]


@pytest.mark.parametrize("recipe", shipped.SHIPPED_RECIPES, ids=shipped.recipe_id)
def test_every_shipped_base_is_the_current_recipe_and_intact(recipe):
    """A recipe change renames the base's cache folder: this fails until it is shipped again
    (``python -m opd.testbed.ship``), so a stale base is never the one users get."""
    from transformers import AutoModelForCausalLM

    sums = shipped.shipped_sums()
    clean, damaged = (builder.student_base_path(**recipe, target_accuracy=t) for t in (None, builder.STUDENT_TARGET))
    assert {clean.name, damaged.name} <= set(sums), f"ship the bases again: {clean.name}, {damaged.name} not in {sorted(sums)}"
    for name in (clean.name, damaged.name):
        for file, sha in sums[name].items():
            assert _sha(shipped.ROOT / name / file) == sha, (name, file)
    info = json.loads((shipped.ROOT / damaged.name / "READY.json").read_text())
    assert info["target_accuracy"] == builder.STUDENT_TARGET and info["eval_val"]["eval/accuracy"] <= builder.STUDENT_TARGET
    assert info["warmup_eval_val"]["eval/accuracy"] >= builder.STUDENT_CONVERGED
    model = AutoModelForCausalLM.from_pretrained(shipped.ROOT / damaged.name)
    assert model.config.num_hidden_layers == recipe.get("layers", builder.STUDENT_ARCH["num_hidden_layers"])
    assert info["task"] == recipe["task"] and info["horizon"] == recipe["horizon"]


def test_the_package_data_globs_take_every_shipped_file():
    """A wheel built from pyproject.toml holds every shipped file (else a pip install builds the base anew)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["opd"]
    package = root / "src" / "opd"
    files = [p.relative_to(package).as_posix() for p in shipped.ROOT.rglob("*") if p.is_file()]
    assert len(files) == 1 + sum(len(names) for names in shipped.shipped_sums().values())
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files


def test_ship_only_builds_the_named_recipes_and_names_them_on_a_typo(monkeypatch, tmp_path, capsys):
    from opd.testbed import ship as ship_cli

    built = []
    monkeypatch.setenv("OPD_SHIPPED_BASES", "1")
    monkeypatch.setattr(ship_cli, "prepare_student_base",
                        lambda **kw: built.append((kw, shipped.enabled())) or tmp_path / f"b{len(built)}")
    monkeypatch.setattr(ship_cli, "ship", lambda folder: {"model.safetensors": folder.name * 12})
    plain = shipped.SHIPPED_RECIPES[0]
    ship_cli.main(["--only", shipped.recipe_id(plain)])
    assert [{k: v for k, v in kw.items() if k != "target_accuracy"} for kw, _ in built] == [plain] * 2
    assert [kw.get("target_accuracy", "damaged") for kw, _ in built] == [None, "damaged"]  # clean, then damaged
    assert [on for _, on in built] == [False, False]  # built anew, not copied from the shipped files
    chained = next(r for r in shipped.SHIPPED_RECIPES if ship_cli.start_recipe(r) is not None)
    built.clear()
    ship_cli.main(["--only", shipped.recipe_id(chained)])  # its start base as shipped, then it anew
    start = ship_cli.start_recipe(chained)
    assert built == [({**start, "target_accuracy": None}, True), ({**chained, "target_accuracy": None}, False),
                     (chained, False)]
    ship_cli.main(["--list"])
    listed = capsys.readouterr().out.splitlines()[-len(shipped.SHIPPED_RECIPES):]
    assert listed == [shipped.recipe_id(r) for r in shipped.SHIPPED_RECIPES]
    with pytest.raises(SystemExit):
        ship_cli.main(["--only", "addition-h5"])
    err = capsys.readouterr().err
    assert "no shipped recipe is named addition-h5" in err and shipped.recipe_id(chained) in err
    assert len(built) == 3  # neither --list nor the typo built anything


def test_a_chained_recipe_ships_from_the_shipped_base_it_starts_from():
    """``python -m opd.testbed.ship`` takes a recipe's start base (``from_horizon``) as shipped."""
    from opd.testbed.ship import start_recipe

    recipe = {"task": "modchain_labeled", "horizon": 32, "layers": 4, "seed": 1}
    assert start_recipe(recipe) == {**recipe, "horizon": 16}
    assert start_recipe({"task": "modchain_labeled", "horizon": 16, "layers": 4}) is None
    assert start_recipe({"task": "addition", "horizon": 4}) is None
