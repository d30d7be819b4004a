"""``opd quickstart``'s runs on worker processes: the same numbers as one at a time."""

import json

import pytest

from opd.compare import quickstart as qs
from opd.errors import UserError


@pytest.fixture
def tiny_quickstart(tiny_cfg, tmp_path, monkeypatch):
    """Two methods x two seeds of two-step runs on the tiny student (built by the parent:
    the workers get the configs, not this patch)."""
    monkeypatch.setattr(qs, "SEEDS", (0, 1))
    monkeypatch.setattr(qs, "RECIPES", {k: qs.RECIPES[k] for k in ("sft", "opd")})

    def config(out_dir, name, lr, eval_split="test", run_name=None, seed=0):
        recipe = {k: v for k, v in qs.RECIPES[name].items() if k not in ("prompts_per_step", "group_size")}
        return tiny_cfg(**recipe, lr=lr, seed=seed, eval_every=1, run_dir=str(out_dir / run_name))

    monkeypatch.setattr(qs, "base_config", config)


def test_runs_on_two_workers_give_the_numbers_of_one_at_a_time(tiny_quickstart, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting, so that the serial path matches it
    try:
        lrs = {"sft": 1e-2, "opd": 1e-2}
        serial = qs.run_all(tmp_path / "serial", lrs, jobs=1)
        pooled = qs.run_all(tmp_path / "pooled", lrs, jobs=2)
    finally:
        torch.set_num_threads(threads)
    assert set(serial) == set(pooled) == {"sft", "opd"}
    for name in serial:
        assert serial[name]["finals"] == pooled[name]["finals"]
        assert _timeless(serial[name]["history"]) == _timeless(pooled[name]["history"])
        assert len(serial[name]["history"]) == 3 and pooled[name]["wall_s"] > 0  # evaluations at steps 0, 1, 2
        for seed in qs.SEEDS:  # every logged number of every run (losses, gradient norms, lengths) but the clock
            rows = [_timeless(_lines(tmp_path / way / name / f"seed{seed}" / "metrics.jsonl")) for way in ("serial", "pooled")]
            assert rows[0] == rows[1] and any("optim/grad_norm" in r for r in rows[0])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _timeless(rows):
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/") and "wall" not in k}
            for r in rows]


def test_a_worker_count_below_one_is_refused():
    with pytest.raises(UserError, match="--jobs 0: the number of worker processes must be at least 1"):
        qs.quickstart(jobs=0)
    assert 1 <= qs.default_jobs() <= 8


def test_tuning_runs_the_grid_widens_past_an_edge_and_records_the_base(tiny_quickstart, tmp_path, monkeypatch):
    monkeypatch.setattr(qs, "LR_GRID", [1e-9, 1e-2])
    monkeypatch.setattr(qs, "LR_EXTEND", 1)
    monkeypatch.setattr(qs, "LR_FILE", tmp_path / "lrs.json")
    info = qs.tune(tmp_path, jobs=1, student_base="abc123")
    assert json.loads((tmp_path / "lrs.json").read_text()) == info and info["student_base"] == "abc123"
    for name in ("sft", "opd"):
        tried = sorted(float(lr) for lr in info["grid"][name])
        assert tried[:2] == [1e-9, 1e-2] or tried[-2:] == [1e-9, 1e-2]  # the grid, then one widening past an edge choice
        assert f"{info['chosen'][name]:g}" in info["grid"][name] and (len(tried) == 3 or info["bracketed"][name])
        runs = sorted(p.name for p in (tmp_path / "tune").iterdir() if p.name.startswith(name))
        assert len(runs) == 2 * len(tried)  # both tuning seeds at every lr tried
    with pytest.warns(UserWarning, match="tuned on the student base abc123, not on this one \\(def456"):
        assert qs.stored_lrs("def456")["chosen"] == info["chosen"]


def test_a_failed_run_on_a_worker_raises_and_cancels_the_runs_not_started(tiny_quickstart, tmp_path):
    """The first run's config names a student that does not exist, so it fails on its worker
    at once; the error reaches the caller, and of the 15 good runs queued behind it only those
    a worker took before the failure came back ever start (a few, by timing): the rest are
    cancelled. Without the cancel, the pool would run all 15 before raising."""
    configs = {f"run {i:02d}": qs.base_config(tmp_path, "sft", 1e-2, run_name=f"run{i:02d}", seed=i) for i in range(16)}
    configs["run 00"] = qs.with_changes(configs["run 00"], student=str(tmp_path / "no-such-model"))
    with pytest.raises(Exception, match="no-such-model"):
        qs.train_all(configs, jobs=2)
    started = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run"))
    assert "run00" not in started and len(started) < 12 and "run15" not in started, started
