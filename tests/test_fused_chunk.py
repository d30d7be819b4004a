"""The compiled chunk kernel (``kernel="compiled"``): ``torch.compile`` of
:func:`opd.losses.fused_chunk.closed_form` gives the eager passes' values and gradients.

The uncompiled closed form runs through every lean-loss test (the ``loss_kernel`` fixture);
here it is compiled for real (the CPU's C++ backend; tests/test_cuda.py does it on a GPU)."""

import math

import pytest
import torch

from opd.losses.chunked import chunked_divergence, chunked_divergence_loss
from opd.losses.divergence import divergence
from opd.losses.fused_chunk import kernel_choice

N, H, V, CHUNK = 37, 8, 50, 8  # 37 = 4 x 8 + 5: a ragged last chunk


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    W = torch.randn(V, H, generator=g).requires_grad_()
    t = 2.0 * torch.randn(N, V, generator=g)
    t[3, 7] = math.nan  # a NaN row: value NaN, no gradient
    t[5] = -math.inf  # a row without mass: value 0, no gradient
    w = torch.rand(N, generator=g)
    w[3] = 0.0  # the NaN row is masked, so the loss stays finite
    return h, W, t, w


def _loss_and_grads(kernel, kind, **kw):
    h, W, t, w = _inputs()
    loss, values = chunked_divergence_loss(h, W, t, kind, w, chunk_size=CHUNK, kernel=kernel, **kw)
    loss.backward()
    return loss.detach(), values, h.grad, W.grad


@pytest.mark.parametrize("kind, kw", [
    ("jsd", dict(beta=0.5)),
    ("rkl", dict(entry_clip=0.05, temperature=2.0, teacher_floor=-12.0)),
])  # fmt: skip
def test_compiled_equals_eager_and_the_naive_form(kind, kw):
    got = _loss_and_grads("compiled", kind, **kw)
    eager = _loss_and_grads("eager", kind, **kw)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    floored = "teacher_floor" in kw  # a floored teacher reads a NaN logit as no mass, not as NaN
    assert math.isnan(got[1][3]) != floored and got[1][5] == 0.0 and torch.isfinite(got[0])
    h, W, t, w = _inputs()  # the naive form on the rows that have a distribution
    keep = [i for i in range(N) if i not in (3, 5)]
    naive_kw = {k: v for k, v in kw.items() if k != "teacher_floor"}
    t_naive = t if "teacher_floor" not in kw else t.log_softmax(-1).clamp_min(kw["teacher_floor"])
    naive = divergence((h @ W.T)[keep], t_naive[keep], kind, **naive_kw)
    torch.testing.assert_close(got[1][keep], naive.detach(), rtol=1e-4, atol=1e-5)
    (naive * w[keep]).sum().backward()
    torch.testing.assert_close(got[2], h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[3], W.grad, rtol=1e-4, atol=1e-5)


def test_compiled_differentiable_values_for_any_upstream_gradient():
    h, W, t, _ = _inputs(seed=1)
    t[3, 7] = 0.0  # no NaN: the upstream gradient below weights every row
    g = torch.randn(N, generator=torch.Generator().manual_seed(2))
    grads = []
    for kernel in ("compiled", "eager"):
        values = chunked_divergence(h, W, t, "fkl", chunk_size=CHUNK, kernel=kernel)
        grads.append(torch.autograd.grad((values * g).sum(), (h, W)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("OPD_LOSS_KERNEL", raising=False)
    assert kernel_choice(None) == "eager" and kernel_choice("compiled") == "compiled"
    monkeypatch.setenv("OPD_LOSS_KERNEL", "compiled")
    assert kernel_choice(None) == "compiled" and kernel_choice("eager") == "eager"
    monkeypatch.setenv("OPD_LOSS_KERNEL", "triton")
    with pytest.raises(ValueError, match="OPD_LOSS_KERNEL"):
        kernel_choice(None)


def test_default_kernel_by_device(monkeypatch):
    monkeypatch.delenv("OPD_LOSS_KERNEL", raising=False)
    assert kernel_choice(None, "cuda") == "compiled" and kernel_choice(None, torch.device("cpu")) == "eager"
    monkeypatch.setenv("OPD_LOSS_KERNEL", "eager")
    assert kernel_choice(None, "cuda") == "eager"


def test_a_failing_compiler_falls_back_to_the_same_numbers(monkeypatch):
    import torch._dynamo.exc

    from opd.losses import fused_chunk

    def refuse(*args, **kwargs):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile limit")

    monkeypatch.setitem(fused_chunk._COMPILED, "fn", refuse)
    with pytest.warns(UserWarning, match="compiled loss kernel failed"):
        got = _loss_and_grads("compiled", "jsd")
    assert fused_chunk._COMPILED["fn"] is fused_chunk.closed_form  # later chunks skip the compiler
    for a, b in zip(got, _loss_and_grads("eager", "jsd")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_chunks_of_any_size_share_one_compiled_graph():
    from torch._dynamo.utils import counters

    from opd.losses.fused_chunk import compiled_closed_form

    before = counters["stats"]["unique_graphs"]
    for rows in (9, 7, 3, 9):  # a setting no other test compiles (beta 0.25)
        s, t = torch.randn(rows, 20), torch.randn(rows, 20)
        compiled_closed_form(s, t, torch.ones(rows), "jsd", 0.25, 1.0, None, None, torch.float32)
    assert counters["stats"]["unique_graphs"] - before == 1


def test_a_runs_loss_kernel_sets_the_default(monkeypatch):
    from opd.losses.fused_chunk import default_kernel

    monkeypatch.setenv("OPD_LOSS_KERNEL", "eager")
    with default_kernel("compiled"):
        assert kernel_choice(None) == "compiled" and kernel_choice("eager") == "eager"
        with default_kernel("auto"):  # auto: the environment (then the device) decides
            assert kernel_choice(None, "cuda") == "eager"
    assert kernel_choice(None) == "eager"
    with pytest.raises(ValueError, match="loss kernel"):
        with default_kernel("fast"):
            pass


def test_training_with_the_compiled_kernel_equals_eager(tiny_cfg, tmp_path, monkeypatch):
    """Two `opd train` steps of GKD (full-vocabulary JSD through the lean loss) under each
    ``loss_kernel``: the same losses, and the compiled run did call the compiled kernel."""
    import opd.losses.chunked as chunked
    from opd.run.metrics_log import read_metrics
    from opd.run.runner import train

    calls, compiled = [], chunked.compiled_closed_form
    monkeypatch.setattr(chunked, "compiled_closed_form", lambda *a, **k: calls.append(1) or compiled(*a, **k))
    losses = {}
    for kernel in ("eager", "compiled"):
        cfg = tiny_cfg(method="gkd", loss_kernel=kernel, run_dir=str(tmp_path / kernel))
        train(cfg)
        losses[kernel] = [v for r in read_metrics(cfg.run_dir) for k, v in sorted(r.items()) if k.startswith("loss")]
    assert len(losses["eager"]) >= 2 and calls
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-6)
