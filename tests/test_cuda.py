"""The device half, on a GPU (skipped without CUDA; `bash bench/gpu.sh` runs it first).

Every method trains on ``device=cuda`` and its first step's loss equals the CPU run's (the
same rollout: the uniforms are drawn on the host from the same seed); a bf16 run of OPD and
GKD stays finite; the sampler's CUDA graph samples what its eager step samples; the chunked
loss on CUDA with bf16 hidden states and a float32 head matches the float32 reference, its
gradients too (the head's through the tensor cores' float32 product), under both chunk kernels
(``kernel="compiled"``: Triton kernels from ``torch.compile``, for each divergence).
"""

import math

import pytest
import torch

from opd.losses import chunked
from opd.losses.chunked import chunked_divergence_loss
from opd.losses.divergence import divergence
from opd.methods import METHODS
from opd.run.metrics_log import read_metrics
from opd.run.runner import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _first_losses(cfg) -> dict:
    train(cfg)
    rows = read_metrics(cfg.run_dir)
    return {k: v for k, v in rows[1].items() if k.startswith("loss")}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_on_cuda_as_on_cpu(method, tiny_cfg, tmp_path):
    knobs = dict(method=method, lmbda=1.0 if method == "gkd" else 0.5, steps=1)
    gpu = _first_losses(tiny_cfg(device="cuda", run_dir=str(tmp_path / "gpu"), **knobs))
    cpu = _first_losses(tiny_cfg(device="cpu", run_dir=str(tmp_path / "cpu"), **knobs))
    assert gpu.keys() == cpu.keys() and gpu
    for key in gpu:
        assert math.isfinite(gpu[key])
        assert abs(gpu[key] - cpu[key]) <= 1e-3 * max(1.0, abs(cpu[key])), (key, gpu[key], cpu[key])


@pytest.mark.parametrize("method", ["opd", "gkd"])
def test_bf16_on_cuda_stays_finite(method, tiny_cfg, tmp_path):
    cfg = tiny_cfg(method=method, device="cuda", dtype="bfloat16", steps=3, run_dir=str(tmp_path / "bf16"))
    train(cfg)
    rows = read_metrics(cfg.run_dir)
    losses = [v for r in rows[1:] for k, v in r.items() if k.startswith("loss")]
    assert losses and all(math.isfinite(v) for v in losses)


def test_sampler_graph_samples_what_the_eager_step_samples(tiny_student_dir):
    from transformers import AutoModelForCausalLM

    from opd.models.sampler import Decoder, sample

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir).cuda().eval()
    prompts = [[2, 3, 4], [5], [6, 7], [8, 9, 10, 11]] * 4
    kw = dict(max_new_tokens=24, eos_id=1, pad_id=0, temperature=1.0)
    dec = Decoder(model, prompts, 0, max_new_tokens=24)
    assert dec.path == "fast" and dec.impl.step == "graph"
    runs = [sample(model, prompts, generator=torch.Generator().manual_seed(3), step=s, **kw) for s in ("graph", "dynamic")]
    assert torch.equal(runs[0].batch.input_ids_BL.cpu(), runs[1].batch.input_ids_BL.cpu())
    assert (runs[0].sampler_logp_BT - runs[1].sampler_logp_BT).abs().max() <= 1e-4


@pytest.mark.parametrize("kernel, kind", [("eager", "jsd"), ("compiled", "jsd"), ("compiled", "rkl"), ("compiled", "fkl")])
def test_chunked_loss_on_cuda_with_bf16_hidden_and_float32_head(kernel, kind):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 300, 64, 5000  # 300 = 2 x 128 + 44: a ragged last chunk
    hidden = torch.randn(n, h, device="cuda", generator=g).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).requires_grad_()
    teacher = torch.randn(n, v, device="cuda", generator=g)
    w = torch.full((n,), 1.0 / n, device="cuda")
    loss, _ = chunked_divergence_loss(hidden.bfloat16(), weight, teacher, kind, w, beta=0.5, chunk_size=128, kernel=kernel)
    (g_h, g_w) = torch.autograd.grad(loss, (hidden, weight))
    ref = (divergence(hidden @ weight.T, teacher, kind, beta=0.5) * w).sum()
    (r_h, r_w) = torch.autograd.grad(ref, (hidden, weight))
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())
    assert float((g_h - r_h).norm() / r_h.norm()) <= 2e-2 and float((g_w - r_w).norm() / r_w.norm()) <= 2e-2
    if "dtype" in torch.ops.aten.addmm.overloads():  # this torch makes dW's product in float32 from bf16
        assert chunked._MIXED_MM["ok"]
