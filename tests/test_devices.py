"""Devices and precision on the CPU: every tensor on its model's device, bf16, memory knobs.

The device check runs every method's training step and an evaluation with the default
device set to ``meta`` (models and data on the CPU): a factory call that names no device
makes a meta tensor, and the first operation that mixes it with a real one fails. The
self-test drops one ``device=`` from the loop's source and shows the check catches it.
"""

import inspect
import math
import textwrap

import pytest
import torch

from opd.errors import UserError
from opd.methods import METHODS
from opd.models.device import resolve_device
from opd.run import loop
from opd.run.evaluate import evaluate
from opd.run.loop import make_optimizer, pick_problems, step_generator, train_step, update
from opd.run.metrics_log import read_metrics
from opd.run.runner import train
from opd.run.setup import build_setup, enable_checkpointing


def _step_on_meta(setup, cfg):
    """One training step and one evaluation with ``meta`` as the default device."""
    generator = step_generator(cfg.seed, 0)
    problems = pick_problems(setup.train_pool, cfg.prompts_per_step, generator)
    optimizer = make_optimizer(setup.env.student, cfg.lr, 0.0)
    with torch.device("meta"):
        metrics, _ = train_step(setup.env, setup.method, problems, generator, optimizer, micro_batch_size=3,
                                max_grad_norm=1.0, ppo_epochs=1)
        row = evaluate(setup.env, setup.eval_problems[:2], k=2, temperature=1.0, seed=0)
    return metrics, row


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_tensor_a_step_creates_names_its_device(method, tiny_cfg):
    cfg = tiny_cfg(method=method, lmbda=1.0 if method == "gkd" else 0.5, eval_size=2)
    metrics, row = _step_on_meta(build_setup(cfg), cfg)
    assert math.isfinite(metrics["optim/grad_norm"]) and 0.0 <= row["eval/accuracy"] <= 1.0


def test_a_dropped_device_is_caught(tiny_cfg, monkeypatch):
    source = textwrap.dedent(inspect.getsource(loop.rollout_metrics))
    dropped = source.replace(", device=mask_BT.device)", ")")
    assert dropped != source, "the loop no longer names the device there: pick another line for this self-test"
    namespace = dict(vars(loop))
    exec(dropped, namespace)  # the same function with one device= dropped
    cfg = tiny_cfg(method="opd", eval_size=2)
    setup = build_setup(cfg)
    _step_on_meta(setup, cfg)  # as written: passes
    monkeypatch.setattr(loop, "rollout_metrics", namespace["rollout_metrics"])
    with pytest.raises((RuntimeError, NotImplementedError)):
        _step_on_meta(setup, cfg)


def test_device_names():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda:1")


def test_bad_device_stops_before_anything_is_written(tiny_cfg, tmp_path):
    cfg = tiny_cfg(device="tpu:0" if torch.cuda.is_available() else "cuda")
    with pytest.raises(UserError):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_float16_is_refused_naming_bfloat16(tiny_cfg):
    with pytest.raises(Exception, match="use dtype=bfloat16"):
        tiny_cfg(dtype="float16")


def _losses(cfg) -> list[float]:
    train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir) if any(k.startswith("loss/") for k in r)]
    key = min(k for k in rows[0] if k.startswith("loss/"))
    return [r[key] for r in rows]


@pytest.mark.parametrize("method", ["opd", "gkd"])
def test_bf16_tracks_float32(method, tiny_cfg, tmp_path):
    """bf16 (teacher weights bf16, student under bf16 autocast over float32 master weights)
    stays finite; on the first step (the same rollout: only the compute precision differs)
    its loss is within 0.5% of the float32 run's, and within 5% on the later steps (whose
    rollouts may differ by a token drawn near a bf16 rounding boundary). The checkpoint
    holds float32 weights: the master copy was never rounded to bf16."""
    from safetensors.torch import load_file

    knobs = dict(method=method, steps=3, lmbda=1.0, lr=3e-3)
    fp32 = _losses(tiny_cfg(run_dir=str(tmp_path / "fp32"), **knobs))
    bf16 = _losses(tiny_cfg(run_dir=str(tmp_path / "bf16"), dtype="bfloat16", **knobs))
    assert len(fp32) == len(bf16) == 3 and all(math.isfinite(x) for x in bf16)
    gaps = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    assert gaps[0] <= 0.005 and max(gaps) <= 0.05, (fp32, bf16)
    weights = load_file(str(tmp_path / "bf16/checkpoints/step_000003/model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def _grads(setup, exp, signal, micro_batch_size, lean=True):
    model = setup.env.student
    optimizer = make_optimizer(model, 0.0, 0.0)  # lr 0: the step leaves the weights as they are
    update(model, optimizer, exp, signal, setup.method, micro_batch_size=micro_batch_size, max_grad_norm=0.0, lean=lean)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _experience(cfg):
    setup = build_setup(cfg)
    setup.env.student.double()
    generator = step_generator(0, 0)
    problems = pick_problems(setup.train_pool, cfg.prompts_per_step, generator)
    exp = setup.method.rollout(setup.env, problems, generator)
    scores = setup.env.teacher.score(exp.batch, topk=8, full=True) if setup.method.teacher_request else None
    signal = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in setup.method.signal(exp, scores).items()}
    return setup, exp, signal


@pytest.mark.parametrize("method", ["opd", "gkd", "grpo"])
def test_micro_batches_give_the_gradient_of_one_batch(method, tiny_cfg):
    """float64: rows one at a time (each micro-batch cut to its own width) vs all at once."""
    setup, exp, signal = _experience(tiny_cfg(method=method, lmbda=1.0, prompts_per_step=3, group_size=2))
    lengths = exp.batch.completion_mask_BT.sum(1)
    assert lengths.min() < lengths.max(), "equal lengths: the per-micro-batch cut is not exercised"
    one = _grads(setup, exp, signal, micro_batch_size=64)
    each = _grads(setup, exp, signal, micro_batch_size=1)
    assert (one - each).abs().max() <= 1e-6 * max(1.0, float(one.abs().max()))


def test_trimming_a_micro_batch_changes_nothing(tiny_cfg, monkeypatch):
    setup, exp, signal = _experience(tiny_cfg(method="opd", prompts_per_step=3, group_size=2))
    cut = _grads(setup, exp, signal, micro_batch_size=2)
    monkeypatch.setattr(loop, "trimmed", lambda batch, sig: (batch, sig, slice(None)))
    full = _grads(setup, exp, signal, micro_batch_size=2)
    assert (cut - full).abs().max() <= 1e-6 * max(1.0, float(full.abs().max()))


def test_gradient_checkpointing_gives_the_same_gradient(tiny_cfg):
    setup, exp, signal = _experience(tiny_cfg(method="opd", prompts_per_step=3, group_size=2))
    plain = _grads(setup, exp, signal, micro_batch_size=64)
    model = setup.env.student
    enable_checkpointing(model)
    recomputed = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: recomputed.append(1))
    ckpt = _grads(setup, exp, signal, micro_batch_size=64)
    assert len(recomputed) == 2, "the layer ran once: nothing was recomputed in backward"
    assert (plain - ckpt).abs().max() <= 1e-9 * max(1.0, float(plain.abs().max()))
