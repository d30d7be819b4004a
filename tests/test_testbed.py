"""The testbed's student base: weight damage and the cached, damaged preparation."""

import json
import warnings

import pytest
import torch

from opd.testbed import builder as testbed
from opd.testbed.tokenizer import build_tokenizer

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def test_damage_adds_noise_of_the_asked_relative_size_and_is_seeded():
    model = testbed.init_model(build_tokenizer(), TINY, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    testbed.damage_weights(model, 0.3, seed=1)
    twin = testbed.init_model(build_tokenizer(), TINY, seed=0)
    testbed.damage_weights(twin, 0.3, seed=1)
    for name, p in model.named_parameters():
        noise = p.detach() - before[name]
        assert torch.equal(p, dict(twin.named_parameters())[name])  # same seed, same damage
        if p.numel() >= 1000:  # the noise's std is 0.3 x the tensor's std (a sample estimate)
            ratio = float(noise.std() / before[name].std())
            assert 0.27 < ratio < 0.33, (name, ratio)


def test_prepared_base_is_damaged_cached_and_reports_both_accuracies(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    monkeypatch.setattr(testbed, "STUDENT_ARCH", TINY)
    monkeypatch.setattr(testbed, "STUDENT_WARMUP", dict(steps=2, lr=1e-3, prompts_per_step=4, stop_at_accuracy=None))
    monkeypatch.setattr(testbed, "DAMAGE_GRID", (0.01, 1.0, 2.0))
    undamaged = testbed.prepare_student_base("addition", 2, quiet=True, target_accuracy=None)
    # a random tiny model scores 0: the first level already reaches a target of 0
    path = testbed.prepare_student_base("addition", 2, quiet=True, target_accuracy=0.0)
    info = json.loads((path / "READY.json").read_text())
    assert info["damage"] == 0.01 and info["eval_val"]["eval/accuracy"] == 0.0
    assert [row["damage"] for row in info["damage_search"]] == [0.01]
    assert "eval/accuracy" in info["warmup_eval_val"] and info["target_accuracy"] == 0.0
    assert undamaged != path and "damage" not in json.loads((undamaged / "READY.json").read_text())
    stamp = (path / "READY.json").stat().st_mtime_ns
    assert testbed.prepare_student_base("addition", 2, quiet=True, target_accuracy=0.0) == path  # cached
    assert (path / "READY.json").stat().st_mtime_ns == stamp
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(undamaged).state_dict()
    diffs = [float((a[k] - b[k]).abs().max()) for k in a]
    assert max(diffs) > 0.0  # the same SFT run, then noise: the weights differ


def test_the_deep_base_has_its_layers_and_its_own_cache_entry(tmp_path, monkeypatch):
    """``student=testbed-x4``: the same recipe with :data:`DEEP_LAYERS` layers, cached apart."""
    import opd.testbed  # noqa: F401  (registers the names)
    from opd.run.sources import lookup

    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    monkeypatch.setattr(testbed, "STUDENT_ARCH", TINY)
    monkeypatch.setattr(testbed, "STUDENT_WARMUP", dict(steps=2, lr=1e-3, prompts_per_step=4, stop_at_accuracy=None))
    shallow = testbed.prepare_student_base("addition", 2, quiet=True, target_accuracy=None)
    deep = lookup("student", "testbed-x4")({"task": "addition", "horizon": 2})
    assert deep != shallow and "damage" in json.loads((deep / "READY.json").read_text())
    layers = lambda path: json.loads((path / "config.json").read_text())["num_hidden_layers"]  # noqa: E731
    assert (layers(shallow), layers(deep)) == (1, testbed.DEEP_LAYERS)


@pytest.mark.filterwarnings("ignore:opd. the 1-layer student base")
def test_base_seed_builds_another_base_in_its_own_cache_entry(tmp_path, monkeypatch):
    """``base_seed``: the same recipe from another seed (initial weights, SFT order, damage),
    cached apart; 0 is the default (the shipped bases' seed)."""
    import opd.testbed  # noqa: F401  (registers the names)
    from opd.run.sources import lookup

    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    monkeypatch.setattr(testbed, "STUDENT_ARCH", TINY)
    monkeypatch.setattr(testbed, "STUDENT_WARMUP", dict(steps=2, lr=1e-3, prompts_per_step=4, stop_at_accuracy=None))
    monkeypatch.setattr(testbed, "DAMAGE_GRID", (0.01, 1.0))
    source = lookup("student", "testbed")
    default, zero, one = (source({"task": "addition", "horizon": 2, **extra}) for extra in ({}, {"base_seed": 0}, {"base_seed": 1}))
    assert default == zero != one and one == testbed.student_base_path("addition", 2, seed=1)
    assert json.loads((one.with_name(one.name.removesuffix("-target0.4")) / "READY.json").read_text())["seed"] == 1
    from transformers import AutoModelForCausalLM

    a, b = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in (zero, one))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # another seed, other weights


@pytest.mark.filterwarnings("ignore:opd. the 1-layer student base")
def test_opd_prepare_builds_the_named_student_of_its_base_seed(tmp_path, monkeypatch, capsys):
    from opd import cli
    from opd.errors import UserError

    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    monkeypatch.setattr(testbed, "STUDENT_ARCH", TINY)
    monkeypatch.setattr(testbed, "STUDENT_WARMUP", dict(steps=2, lr=1e-3, prompts_per_step=4, stop_at_accuracy=None))
    monkeypatch.setattr(testbed, "DAMAGE_GRID", (0.01, 1.0))
    assert cli.main(["prepare", "--horizon", "2", "--base-seed", "1"]) == 0
    assert str(testbed.student_base_path("addition", 2, seed=1)) in capsys.readouterr().out
    with pytest.raises(UserError, match="--student gpt2: not a testbed student; use one of testbed, "):
        testbed.prepare("addition", 2, student="gpt2")


def test_base_seed_on_a_model_of_its_own_is_refused():
    from opd.config.train import TrainConfig
    from opd.errors import UserError
    from opd.run.setup import resolve_student

    with pytest.raises(UserError, match="base_seed=1 .* drop base_seed"):
        resolve_student(TrainConfig(student="/models/qwen", base_seed=1))


def test_warmup_steps_override_a_tasks_own_warmup():
    """``warmup_steps`` lengthens the SFT of a task with its own :data:`TASK_WARMUP` (modchain's
    4,000 steps) too; it raised a TypeError there before (two ``steps``)."""
    assert testbed.student_warmup("modchain")["steps"] == testbed.TASK_WARMUP["modchain"]["steps"]
    assert testbed.student_warmup("modchain_labeled", 8000)["steps"] == 8000
    assert testbed.student_warmup("addition", 500) == {**testbed.STUDENT_WARMUP, "steps": 500}
    assert testbed.student_warmup("addition", correction_rate=0.05)["correction_rate"] == 0.05
    assert "shorter_rate" not in testbed.student_warmup("modchain")  # the cache keys of bases without it stay
    long = testbed.student_warmup("modchain_labeled", horizon=16)
    assert (long["steps"], long["lr"]) == (1200, 1e-3) and testbed.student_warmup("modchain_labeled", horizon=24) == long
    longest = testbed.student_warmup("modchain_labeled", horizon=32)  # from the horizon-16 base
    assert (longest["steps"], longest["lr"], longest["from_horizon"]) == (1800, 5e-4, 16)
    assert testbed.student_warmup("modchain_labeled", horizon=8) == testbed.student_warmup("modchain_labeled")  # h8 unchanged
    assert testbed.student_warmup("modchain", horizon=16)["lr"] == testbed.STUDENT_WARMUP["lr"]  # plain modchain unchanged
    before = testbed.student_warmup("modchain_labeled", 4000, horizon=16, lr=3e-3)  # the recipe horizon 16 had before
    assert before == {**testbed.STUDENT_WARMUP, "steps": 4000, "lr": 3e-3}


def test_a_longer_horizon_can_start_from_the_shorter_base(tmp_path, monkeypatch):
    """``from_horizon``: the base's SFT starts from the clean base of that horizon (built
    first), not from a random model; at an lr of 1e-12 its weights stay that base's, which
    its own 2 steps at lr 3e-2 moved away from the random start (by 1000x more)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    monkeypatch.setattr(testbed, "STUDENT_ARCH", TINY)
    monkeypatch.setattr(testbed, "STUDENT_WARMUP", dict(steps=2, lr=1e-3, prompts_per_step=4, stop_at_accuracy=None))
    monkeypatch.setattr(testbed, "LONG_WARMUP", {"addition": ((2, dict(lr=3e-2)), (3, dict(lr=1e-12, from_horizon=2)))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 2-step bases have not learned the task
        longer = testbed.prepare_student_base("addition", 3, quiet=True, target_accuracy=None)
        start = testbed.prepare_student_base("addition", 2, quiet=True, target_accuracy=None)
    assert json.loads((longer / "READY.json").read_text())["training"]["from_horizon"] == 2
    weights = lambda path: AutoModelForCausalLM.from_pretrained(path).state_dict()  # noqa: E731
    a, b = weights(longer), weights(start)
    c = weights(testbed.save_initial(tmp_path / "random", TINY, seed=0))  # the random model both began from
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert max(float((c[k] - b[k]).abs().max()) for k in c) > 1e-3  # 2 steps of a 10-step warm-up: 0.009


def test_a_rewritten_family_gets_new_bases(tmp_path, monkeypatch):
    """A family with a ``FORMAT`` (modchain_labeled, whose steps were rewritten) puts it in the
    cache key, so a base trained on the old solutions is never reused for the new ones."""
    from opd.testbed import modchain_labeled

    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    monkeypatch.setattr(testbed, "STUDENT_ARCH", TINY)
    monkeypatch.setattr(testbed, "TASK_WARMUP", {})
    monkeypatch.setattr(testbed, "STUDENT_WARMUP", dict(steps=1, lr=1e-3, prompts_per_step=2, stop_at_accuracy=None))
    now = testbed.prepare_student_base("modchain_labeled", 1, quiet=True, target_accuracy=None)
    assert json.loads((now / "READY.json").read_text())["format"] == modchain_labeled.FORMAT
    monkeypatch.setattr(modchain_labeled, "FORMAT", modchain_labeled.FORMAT + 1)
    assert testbed.prepare_student_base("modchain_labeled", 1, quiet=True, target_accuracy=None) != now


def test_unknown_task_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    with pytest.raises(KeyError, match="unknown task 'no-such-task'; known: \\['addition', 'addition_mixed', 'addition_swapped', 'modchain', 'modchain_labeled', 'ring'\\]"):
        testbed.prepare_student_base("no-such-task", 2, quiet=True)
    assert not any(tmp_path.rglob("*"))


def test_damage_search_stops_at_the_first_level_reaching_the_target(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    monkeypatch.setattr(testbed, "STUDENT_ARCH", TINY)
    monkeypatch.setattr(testbed, "STUDENT_WARMUP", dict(steps=2, lr=1e-3, prompts_per_step=4, stop_at_accuracy=None))
    monkeypatch.setattr(testbed, "DAMAGE_GRID", (0.1, 0.2, 0.3))
    accuracies = iter([0.9, 0.5, 0.2])
    monkeypatch.setattr(testbed, "_val_accuracy", lambda *a: {"eval/accuracy": next(accuracies)})
    path = testbed.prepare_student_base("addition", 2, quiet=True, target_accuracy=0.5)
    info = json.loads((path / "READY.json").read_text())
    assert info["damage"] == 0.2 and [r["damage"] for r in info["damage_search"]] == [0.1, 0.2]


def test_two_processes_preparing_one_base_build_it_once(tmp_path, monkeypatch):
    """Two experiments started together on a fresh cache: one builds, the other waits for it
    (before the lock, both wrote the same ``.work`` folder and one failed). Threads here: each
    opens the lock file itself, so they contend as two processes do."""
    import threading
    import time

    from opd.testbed import builder

    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    builds = []

    def fake_sft(init, run_dir, task, horizon, seed, training, quiet):
        builds.append(run_dir)
        time.sleep(0.3)  # long enough for the other thread to arrive meanwhile
        (run_dir / "checkpoints" / "step_000001").mkdir(parents=True)
        return [{"eval/accuracy": 1.0}]

    monkeypatch.setattr(builder, "_sft", fake_sft)
    monkeypatch.setattr(builder, "save_initial", lambda path, *a: path)
    paths = []
    args = ("student", "addition", 4, {"hidden_size": 8}, {"steps": 1}, 0, True)
    threads = [threading.Thread(target=lambda: paths.append(builder._prepare(*args))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(builds) == 1 and len(paths) == 2 and paths[0] == paths[1]
    assert (paths[0] / "READY.json").exists() and not paths[0].with_name(paths[0].name + ".work").exists()


def test_a_base_that_did_not_learn_the_task_warns_each_time_it_is_used(tmp_path, monkeypatch):
    """A student base below :data:`STUDENT_CONVERGED` after SFT (here a 2-step run: accuracy 0)
    is still built and cached, and the warning names the accuracy and the fix, cached or not."""
    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    monkeypatch.setattr(testbed, "STUDENT_ARCH", TINY)
    monkeypatch.setattr(testbed, "STUDENT_WARMUP", dict(steps=2, lr=1e-3, prompts_per_step=4, stop_at_accuracy=None))
    for _ in range(2):  # built, then found in the cache
        with pytest.warns(UserWarning, match=r"ended its SFT at 0\.000 .*testbed-x4"):
            path = testbed.prepare_student_base("addition", 2, quiet=True, target_accuracy=None)
    assert (path / "READY.json").exists()
    with pytest.warns(UserWarning, match=r"Use a shorter horizon; cached") as caught:  # already the deep base
        testbed.prepare_student_base("addition", 2, quiet=True, target_accuracy=None, layers=testbed.DEEP_LAYERS)
    assert "testbed-x4" not in str(caught[0].message)
    monkeypatch.setattr(testbed, "STUDENT_CONVERGED", 0.0)  # at or above the bar: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        testbed.prepare_student_base("addition", 2, quiet=True, target_accuracy=None)
