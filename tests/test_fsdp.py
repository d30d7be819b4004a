"""Data parallel and sharded training: real ``torchrun`` processes, FSDP2 over gloo on the CPU.

Rollouts are greedy (``temperature=0``), so a rank's rows are the single process's rows
whatever the split; what remains to compare is the arithmetic of the split, the global
normalizer, FSDP2's gradient reduction and the sharded checkpoints.

Tolerance: over 4 AdamW steps at lr 1e-2 the weights move by ~0.03 and a 2-rank run
differs from one process by ~2.5e-6 (float32 sums taken in another order: the gradient
averaged over two partial sums); ``WEIGHT_ATOL`` = 5e-5 is 20x that and 600x smaller than the
movement. The weights alone cannot show a wrong loss scale (AdamW is nearly blind to it),
so the logged loss and gradient norm are compared too, to 1e-4 relative: a rank's share
dropped or counted twice, or the token count of one rank used as the step's, moves them by
tens of percent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from run_helpers import subprocess_env

WEIGHT_ATOL = 5e-5
METRIC_RTOL = 1e-4
TIMEOUT_S = 180  # one torchrun launch (a few seconds here)
COMPARED = ("loss/pg", "optim/grad_norm", "rollout/length", "usage/sequences", "usage/teacher_tokens")


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    from opd.testbed.builder import save_initial

    arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return str(save_initial(tmp_path_factory.mktemp("fsdp_student"), arch, seed=0))


def _args(student: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [f"student={student}", "teacher=oracle", "method=opd", "prompts_per_step=4", "group_size=2",
            "micro_batch_size=3", "max_new_tokens=24", "eval_every=0", "eval_size=6", "eval_k=1", "temperature=0",
            "lr=1e-2", f"steps={steps}", f"run_dir={run_dir}", "progress=false", *extra]


def _opd(args: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    """``opd ARGS`` in one process, or under torchrun on ``ranks`` ranks (a free port on
    127.0.0.1); the launcher and its ranks are killed together at ``TIMEOUT_S``."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [sys.executable])
    proc = subprocess.Popen([*launcher, "-m", "opd", *args], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"opd {' '.join(args[:1])} on {ranks} rank(s) ran past {TIMEOUT_S} s: {err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _train(student: str, run_dir: Path, steps: int, ranks: int, *extra: str) -> None:
    done = _opd(["train", *_args(student, run_dir, steps, *extra)], ranks)
    said = [line for line in done.stderr.splitlines() if "arn" not in line and line.strip()]
    assert done.returncode == 0, "\n".join([done.stdout[-2000:], *said[:40], *said[-40:]])


def _weights(run_dir: Path, merge: bool = False) -> dict:
    """The run's newest checkpoint's weights, through ``export`` in this process (a new folder
    each time; a sharded checkpoint is gathered from dcp/ on one process, as ``opd export``
    does; ``test_lora_under_fsdp`` runs the command itself)."""
    from opd.run.export import export

    out = Path(tempfile.mkdtemp(dir=run_dir.parent)) / "export"
    return load_file(str(export(run_dir, out, merge=merge) / "model.safetensors"))


def _rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=WEIGHT_ATOL, rtol=0, msg=key)
    ra, rb = _rows(a), _rows(b)
    assert sorted(ra) == sorted(rb)
    for step in ra:
        for key in COMPARED:
            if key in ra[step]:
                assert rb[step][key] == pytest.approx(ra[step][key], rel=METRIC_RTOL), (step, key)


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_on_one_or_two(student, tmp_path):
    _train(student, tmp_path / "one", 4, 1)
    _train(student, tmp_path / "two", 4, 2)
    _assert_same_run(tmp_path / "one", tmp_path / "two")

    _train(student, tmp_path / "cut2", 2, 2)  # sharded checkpoint at step 2
    ckpt = tmp_path / "cut2" / "checkpoints" / "step_000002"
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(tmp_path / "cut2", tmp_path / "cut1")
    _train(student, tmp_path / "cut2", 4, 2, "resume=true")
    _train(student, tmp_path / "cut1", 4, 1, "resume=true")
    _assert_same_run(tmp_path / "one", tmp_path / "cut2")
    _assert_same_run(tmp_path / "one", tmp_path / "cut1")

    # rank 0 alone wrote the log: one row per step, none twice
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3, 4]
    moved = max(float((w - b).abs().max()) for w, b in zip(_weights(tmp_path / "one").values(),
                                                               load_file(f"{student}/model.safetensors").values()))
    assert moved > 100 * WEIGHT_ATOL  # the comparison above could fail


@pytest.mark.slow
def test_single_process_checkpoint_resumes_on_two_ranks(student, tmp_path):
    _train(student, tmp_path / "one", 3, 1)
    _train(student, tmp_path / "mixed", 2, 1)
    _train(student, tmp_path / "mixed", 3, 2, "resume=true")  # AdamW's state from trainer_state.pt, sharded
    _assert_same_run(tmp_path / "one", tmp_path / "mixed")


@pytest.mark.slow
def test_lora_under_fsdp(student, tmp_path):
    lora = ("lora_r=4", "lora_alpha=8", "lr=3e-2")
    _train(student, tmp_path / "one", 3, 1, *lora)
    _train(student, tmp_path / "two", 3, 2, *lora)
    done = _opd(["export", str(tmp_path / "two"), str(tmp_path / "two_m"), "--merge"])  # the command, on a sharded run
    assert done.returncode == 0, done.stderr[-3000:]
    merged = {"one": _weights(tmp_path / "one", merge=True), "two": load_file(str(tmp_path / "two_m" / "model.safetensors"))}
    for key in merged["one"]:
        torch.testing.assert_close(merged["two"][key], merged["one"][key], atol=WEIGHT_ATOL, rtol=0, msg=key)

    # the sharded checkpoint holds the adapters and the untouched base
    from opd.config.loader import load_config
    from opd.config.train import TrainConfig
    from opd.run.checkpoint import latest_checkpoint, load_sharded_weights
    from opd.run.setup import load_student

    ckpt = latest_checkpoint(tmp_path / "two")
    model = load_student(student, load_config(TrainConfig, ckpt / "config.yaml"))
    load_sharded_weights(ckpt, model)
    base = load_file(f"{student}/model.safetensors")
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert set(base) == set(frozen)
    assert all(torch.equal(frozen[k], base[k]) for k in base)  # bit-identical
    adapters = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert adapters and any(float(p.abs().max()) > 0 for p in adapters)  # B starts at zero: trained


def test_uneven_split_is_refused_and_writes_nothing(student, tmp_path):
    done = _opd(["train", *_args(student, tmp_path / "run", 2, "prompts_per_step=3")], ranks=2)
    assert done.returncode != 0
    assert "prompts_per_step=3 does not split evenly over 2 ranks; use a multiple of 2" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ranks_with_different_row_counts_pad_their_micro_batches(student, tmp_path):
    """GKD's on/off-policy mix gives the ranks different row counts; the ranks with fewer
    micro-batches run padding ones (loss times 0) so that FSDP2's collectives pair up."""
    _train(student, tmp_path / "gkd", 3, 2, "method=gkd", "lmbda=0.5", "temperature=1", "micro_batch_size=1")
    rows = _rows(tmp_path / "gkd")
    assert sorted(rows) == [0, 1, 2, 3] and all(math.isfinite(rows[s]["optim/grad_norm"]) for s in (1, 2, 3))
    assert 0.5 in [rows[s]["rollout/on_policy"] for s in (1, 2, 3)]  # a step where one rank sampled, the other not


def test_micro_batches_of_one_process_are_the_plain_split():
    from opd.run.loop import micro_batches

    assert micro_batches(7, 3) == [(slice(0, 3), False), (slice(3, 6), False), (slice(6, 9), False)]
    assert micro_batches(0, 3) == []
