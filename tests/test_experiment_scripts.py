"""The probed experiment scripts end to end, at a smoke size: a real subprocess runs
``experiments/detour.py`` and ``experiments/myopic.py`` on a tiny student, and each writes
its probe into ``results.json`` with verdicts on the probe's metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from run_helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["seeds=2", "budget=8", "lr_grid=null", "lr=1e-3", "eval_size=4", "eval_every=0", "micro_batch_size=8"]


def _run(script: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments" / script), *args, "--out", str(out), "--no-publish", "--probe-prompts", "3"]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(not published)" in done.stdout
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def tiny_ring_student(tmp_path_factory):
    from opd.testbed import ring
    from opd.testbed.builder import save_initial

    arch = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return str(save_initial(tmp_path_factory.mktemp("ring_student"), arch, seed=0, extra_words=ring.WORDS))


def test_the_detour_script_probes_every_run_and_judges_it(tiny_ring_student, tmp_path):
    results = _run("detour.py", ["ring", "--set", *SMOKE, f"student={tiny_ring_student}"], tmp_path)
    probe = results["probe"]
    assert probe["prompts_per_depth"] == 3 and set(probe["base"]) == {"1", "4", "8"}
    assert set(probe["labels"]) == set(results["labels"]) == {"sft", "grpo", "opd", "opd_continuing"}
    assert all(set(by_seed) == {"0", "1"} for by_seed in probe["labels"].values())
    assert {"probe/back", "probe/recovery", "probe/stops_short"} <= set(results["metric_verdicts"])
    final = results["labels"]["opd"]["final"]["1"]
    assert 0.0 <= final["probe/back"] <= 1.0 and final["probe/back"] == pytest.approx(
        sum(d["back"] for d in probe["labels"]["opd"]["1"].values()) / 3)


def test_the_myopic_script_still_probes_corrections(tiny_student_dir, tmp_path):
    results = _run("myopic.py", ["--set", *SMOKE, f"student={tiny_student_dir}"], tmp_path)
    assert set(results["probe"]["base"]) == {"1", "2", "4"}
    assert {"probe/onset", "probe/wait_redo", "probe/recovery", "probe/false_onset"} <= set(results["metric_verdicts"])
