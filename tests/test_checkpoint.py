"""Checkpoints appear atomically or not at all, are verified when read, and one run owns
its run dir: damaged checkpoints, keep_last, a full disk (patched, and a real tmpfs where
one can be mounted), the run-dir lock, and SIGKILL at random points of checkpoint writes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.errors import UserError
from opd.run.checkpoint import MANIFEST, STATE_FILE, latest_checkpoint, list_checkpoints, verify_checkpoint
from opd.run.lock import acquire_run_lock, release_run_lock
from opd.run.runner import Run, train
from run_helpers import subprocess_env, tiny_cli_args

KILLER = Path(__file__).with_name("checkpoint_killer.py")


_env, _cli_args = subprocess_env, tiny_cli_args


def _names(run_dir) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir)]


def _flip_byte(path: Path, from_end: int = 8) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _weights(path) -> dict:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ---------------------------------------------------------------- names and verification


def test_only_complete_step_folders_are_checkpoints(tmp_path):
    names = ["step_000002", "step_000010", "step_1000000", "step_000003.tmp", ".tmp-step_000011",
             ".old-step_000001", "step_000004.damaged", "step_x", "notes"]
    for name in names:
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / STATE_FILE).write_bytes(b"")
    assert _names(tmp_path) == ["step_000002", "step_000010", "step_1000000"]


@pytest.fixture(scope="module")
def saved_checkpoint(tiny_student_dir, tmp_path_factory) -> Path:
    """A real one-step checkpoint, to be copied and damaged."""
    from opd.config.train import TrainConfig

    run_dir = tmp_path_factory.mktemp("saved")
    cfg = TrainConfig(student=tiny_student_dir, teacher="oracle", steps=1, prompts_per_step=2, group_size=2,
                      max_new_tokens=8, eval_every=0, eval_size=1, eval_k=1, run_dir=str(run_dir), progress=False)
    train(cfg)
    return run_dir / "checkpoints" / "step_000001"


DAMAGE = {
    "flipped byte": (lambda d: _flip_byte(d / "model.safetensors"), "model.safetensors does not match its sha256"),
    "truncated": (lambda d: os.truncate(d / STATE_FILE, 100), f"{STATE_FILE} has 100 bytes, the manifest says "),
    "file missing": (lambda d: (d / "config.yaml").unlink(), "config.yaml is missing"),
    "manifest garbled": (lambda d: (d / MANIFEST).write_text('{"files": 3'), f"{MANIFEST} is unreadable"),
    "write cut short": (lambda d: [(d / MANIFEST).unlink(), (d / STATE_FILE).unlink()], f"no {MANIFEST} (an incomplete write)"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_named(damage, saved_checkpoint, tmp_path):
    copy = shutil.copytree(saved_checkpoint, tmp_path / "step_000001")
    assert verify_checkpoint(copy) is None
    harm, problem = DAMAGE[damage]
    harm(copy)
    assert verify_checkpoint(copy).startswith(problem)


def test_a_checkpoint_from_before_manifests_is_accepted(saved_checkpoint, tmp_path):
    copy = shutil.copytree(saved_checkpoint, tmp_path / "step_000001")
    (copy / MANIFEST).unlink()
    assert verify_checkpoint(copy) is None  # it has its trainer state: written whole by an older opd


def test_flipped_byte_resumes_from_the_previous_checkpoint(tiny_cfg, capsys):
    cfg = tiny_cfg(steps=2, save_every=1)
    train(cfg)
    root = Path(cfg.run_dir) / "checkpoints"
    _flip_byte(root / "step_000002" / "model.safetensors")
    capsys.readouterr()
    run = Run(tiny_cfg(steps=3, save_every=1, resume=True))
    err = capsys.readouterr().err
    assert (f"checkpoint {root / 'step_000002'} is damaged or incomplete (model.safetensors does not match its sha256): "
            "set aside as step_000002.damaged; resuming from step_000001\n") in err
    assert run.resume_from.name == "step_000001" and run.counters["step"] == 1
    good = _weights(root / "step_000001")
    loaded = run.setup.env.student.state_dict()
    assert all(torch.equal(good[k], loaded[k]) for k in good)
    run.fit()
    assert _names(cfg.run_dir) == ["step_000001", "step_000002", "step_000003"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(cfg.run_dir))
    assert (root / "step_000002.damaged").is_dir()


@pytest.mark.parametrize("keep_last,kept", [(2, [3, 4]), (0, [1, 2, 3, 4])])
def test_keep_last(keep_last, kept, tiny_cfg):
    cfg = tiny_cfg(steps=4, save_every=1, keep_last=keep_last, eval_size=2, eval_k=1)
    train(cfg)
    assert _names(cfg.run_dir) == [f"step_{s:06d}" for s in kept]
    assert sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir()) == _names(cfg.run_dir)


# ---------------------------------------------------------------- a full disk


def test_disk_full_keeps_the_previous_checkpoint(tiny_cfg, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step_000002" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = tiny_cfg(steps=2, save_every=1)
    with pytest.raises(UserError) as err:
        train(cfg)
    path = Path(cfg.run_dir) / "checkpoints" / "step_000002"
    assert str(err.value) == (f"out of disk space while writing checkpoint {path}: nothing of it was kept, the previous "
                              "checkpoint (step_000001) is intact; free space, then continue with resume=true")
    assert sorted(os.listdir(path.parent)) == ["step_000001"]  # the temporary folder is gone
    assert latest_checkpoint(cfg.run_dir).name == "step_000001"
    monkeypatch.undo()  # space freed
    train(tiny_cfg(steps=2, save_every=1, resume=True))
    assert _names(cfg.run_dir) == ["step_000001", "step_000002"]


def _can_mount_tmpfs() -> bool:
    """Whether a user and mount namespace can be made here (unprivileged or as root)."""
    if shutil.which("unshare") is None:
        return False
    probe = 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"; rc=$?; umount "$d" 2>/dev/null; rmdir "$d"; exit $rc'
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")
def test_disk_full_on_a_real_tmpfs(tiny_cfg, tiny_student_dir, tmp_path):
    """checkpoints/ on a tmpfs with room for one and a half checkpoints: the second one
    fails with the one-line error; the first one is intact and the run resumes from it."""
    one = tiny_cfg(steps=1, run_dir=str(tmp_path / "one"))
    train(one)
    files = (Path(one.run_dir) / "checkpoints" / "step_000001").iterdir()
    size = sum(-(-p.stat().st_size // 4096) * 4096 for p in files)
    run_dir, kept = tmp_path / "run", tmp_path / "kept"
    (run_dir / "checkpoints").mkdir(parents=True)
    kept.mkdir()
    script = (f'r=$1; k=$2; shift 2; mount -t tmpfs -o size={size * 3 // 2} tmpfs "$r/checkpoints" || exit 99; '
              '"$@"; rc=$?; cp -a "$r/checkpoints/." "$k/"; exit $rc')
    cli = [sys.executable, "-m", "opd", "train", *_cli_args(tiny_student_dir, run_dir), "steps=3", "save_every=1"]
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(run_dir), str(kept), *cli],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"opd: error: out of disk space while writing checkpoint {run_dir / 'checkpoints' / 'step_000002'}: nothing of it "
        "was kept, the previous checkpoint (step_000001) is intact; free space, then continue with resume=true")
    assert sorted(os.listdir(kept)) == ["step_000001"]
    for p in kept.iterdir():
        p.rename(run_dir / "checkpoints" / p.name)
    assert latest_checkpoint(run_dir).name == "step_000001"
    train(tiny_cfg(steps=3, save_every=1, run_dir=str(run_dir), resume=True))
    assert _names(run_dir) == ["step_000001", "step_000002", "step_000003"]


# ---------------------------------------------------------------- one run per run dir


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    code = ("import sys, time; from opd.run.lock import acquire_run_lock; lock = acquire_run_lock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"^run_dir {tmp_path} is in use by another run \(pid {holder.pid} on host "):
            acquire_run_lock(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait(timeout=30)
    lock = acquire_run_lock(tmp_path)  # the kernel released the killed holder's lock
    assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"
    release_run_lock(lock)


def test_a_second_run_object_on_one_dir_is_refused(tiny_cfg):
    first = Run(tiny_cfg(steps=1))
    with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on host"):
        Run(tiny_cfg(steps=1, overwrite=True))
    first.fit()  # the lock ends with the run
    Run(tiny_cfg(steps=2, resume=True)).fit()


# ---------------------------------------------------------------- SIGKILL during writes


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_always_leaves_a_resumable_run(tiny_student_dir, tmp_path):
    kills = 40
    out = subprocess.run([sys.executable, str(KILLER), tiny_student_dir, str(tmp_path / "run"), str(kills), "0"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    assert result["resumed"] == kills + 1 and result["trained_after"]
    assert result["partial_writes"] >= kills // 4, result  # the kills landed inside writes


def test_weights_sha256_hashes_the_weight_files_alone(tmp_path):
    """Naive reference: sha256 over ``name:sha256(bytes)`` lines of the weight files in name
    order; the trainer state, the config and the tokenizer do not count; a changed byte does."""
    import hashlib

    from opd.run.checkpoint import weights_sha256

    (tmp_path / "model-00002.safetensors").write_bytes(b"second shard")
    (tmp_path / "model-00001.safetensors").write_bytes(b"first shard")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "trainer_state.pt").write_bytes(b"optimizer")
    lines = "".join(f"model-0000{i}.safetensors:{hashlib.sha256(b).hexdigest()}\n"
                    for i, b in ((1, b"first shard"), (2, b"second shard")))
    assert weights_sha256(tmp_path) == hashlib.sha256(lines.encode()).hexdigest()
    (tmp_path / "config.json").write_text('{"changed": 1}')
    (tmp_path / "trainer_state.pt").write_bytes(b"other optimizer")
    assert weights_sha256(tmp_path) == hashlib.sha256(lines.encode()).hexdigest()
    (tmp_path / "model-00002.safetensors").write_bytes(b"second shard!")
    assert weights_sha256(tmp_path) != hashlib.sha256(lines.encode()).hexdigest()
    assert weights_sha256(tmp_path / "absent") is None and weights_sha256("org/model-on-the-hub") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert weights_sha256(empty) is None
