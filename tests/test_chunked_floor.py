"""The chunked divergence with the teacher's log-prob floor and with bf16 hidden states,
against the naive full-logits form (``divergence`` of ``h W^T`` vs ``floored_logp_V``)."""

import pytest
import torch

from opd.losses.chunked import chunked_divergence, chunked_divergence_loss
from opd.losses.divergence import divergence
from opd.signals.teacher_logp import TEACHER_LOGP_FLOOR, floored_logp_V

pytestmark = pytest.mark.usefixtures("loss_kernel")  # each test under both chunk kernels (conftest)

CASES = [
    dict(kind="fkl"), dict(kind="rkl"), dict(kind="jsd", beta=0.5), dict(kind="jsd", beta=0.9),
    dict(kind="rkl", entry_clip=0.05), dict(kind="jsd", beta=0.5, temperature=2.0),
    dict(kind="rkl", support="teacher_topk", k=3), dict(kind="fkl", support="student_topk", k=2),
]


def _inputs(dtype=torch.float64, n=37, h=8, v=50):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, generator=g, dtype=dtype) / h**0.5).requires_grad_()
    t_hidden = torch.randn(n, h, generator=g, dtype=dtype)
    t_weight = torch.randn(v, h, generator=g, dtype=dtype) * 3.0  # sharp: many entries under the floor
    t_logits = t_hidden @ t_weight.T
    t_logits[0, :10] = float("-inf")  # entries without mass
    t_logits[1, 5] = float("nan")  # a NaN entry carries no mass
    return hidden, weight, t_hidden, t_weight, t_logits


def _naive(hidden, weight, t_logits, floor, **kw):
    return divergence(hidden @ weight.T, floored_logp_V(t_logits, floor), **kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("floor", [TEACHER_LOGP_FLOOR, -3.0])
def test_floored_teacher_matches_the_naive_form(case, floor):
    hidden, weight, _, _, t_logits = _inputs()
    w = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _naive(hidden, weight, t_logits, floor, **case)
    assert (floored_logp_V(t_logits, floor) == floor).any(), "no entry reached the floor: it is not exercised"
    g_ref = torch.autograd.grad((w * ref).sum(), (hidden, weight))
    loss, values = chunked_divergence_loss(hidden, weight, t_logits, weights_N=w, chunk_size=5, teacher_floor=floor, **case)
    g = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(values, ref.detach(), rtol=1e-9, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    values2 = chunked_divergence(hidden, weight, t_logits, chunk_size=7, teacher_floor=floor, **case)
    torch.testing.assert_close(values2, ref, rtol=1e-9, atol=1e-10)


def test_floor_changes_the_value_where_the_teacher_is_sharp():
    hidden, weight, _, _, t_logits = _inputs()
    plain = chunked_divergence(hidden, weight, t_logits, "rkl", chunk_size=5)
    floored = chunked_divergence(hidden, weight, t_logits, "rkl", chunk_size=5, teacher_floor=-3.0)
    assert (plain - floored)[2:].abs().max() > 1e-3  # the floor is applied, not ignored (rows 2+: no -inf/NaN)


def test_teacher_as_hidden_and_head_equals_teacher_logits():
    hidden, weight, t_hidden, t_weight, _ = _inputs()
    a = chunked_divergence(hidden, weight, (t_hidden, t_weight), "jsd", chunk_size=4, teacher_floor=TEACHER_LOGP_FLOOR)
    b = chunked_divergence(hidden, weight, t_hidden @ t_weight.T, "jsd", chunk_size=9, teacher_floor=TEACHER_LOGP_FLOOR)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_bf16_hidden_with_a_float32_head(kind):
    """Autocast's case: bf16 hidden states, float32 master weight. Values and gradients within
    bf16 rounding of the float32 computation; the weight's gradient comes back float32."""
    hidden, weight, t_hidden, t_weight, _ = _inputs(torch.float32, n=64, h=32, v=300)
    t_logits = (t_hidden @ t_weight.T) / 3.0
    w = torch.full((64,), 1 / 64)
    ref_loss, _ = chunked_divergence_loss(hidden, weight, t_logits, kind, w, chunk_size=16)
    g_ref = torch.autograd.grad(ref_loss, (hidden, weight))
    h16 = hidden.detach().bfloat16().requires_grad_()
    loss, _ = chunked_divergence_loss(h16, weight, t_logits, kind, w, chunk_size=16)
    g_h, g_w = torch.autograd.grad(loss, (h16, weight))
    assert g_h.dtype == torch.bfloat16 and g_w.dtype == torch.float32
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 2e-2 * abs(float(ref_loss.detach()))
    for got, ref in ((g_h.float(), g_ref[0]), (g_w, g_ref[1])):
        assert float((got - ref).norm() / ref.norm()) <= 5e-2


@pytest.mark.parametrize("kind", ["rkl", "jsd"])
def test_expected_gradient_shortcut_and_its_fallback(kind):
    """With ``expected_grad`` = the mask, a masked token mean's gradient (c·mask) is served
    from the forward; any other upstream gradient recomputes: both equal the naive form."""
    from opd.losses.reduce import masked_token_mean

    hidden, weight, _, _, t_logits = _inputs()
    mask = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(3)) > 0.3
    ref = _naive(hidden, weight, t_logits, TEACHER_LOGP_FLOOR, kind=kind)
    for reduce in (lambda d: masked_token_mean(d, mask, 17.0), lambda d: (d * torch.linspace(0, 1, d.shape[0], dtype=d.dtype)).sum()):
        g_ref = torch.autograd.grad(reduce(ref), (hidden, weight), retain_graph=True)
        got = chunked_divergence(hidden, weight, t_logits, kind, chunk_size=6, teacher_floor=TEACHER_LOGP_FLOOR,
                                 expected_grad=mask)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
        for a, b in zip(torch.autograd.grad(reduce(got), (hidden, weight)), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
