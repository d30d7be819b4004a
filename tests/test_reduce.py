"""Masked reductions against naive loops, micro-batch additivity, hostile inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.losses.reduce import masked_row_mean, masked_sequence_mean, masked_token_mean

TOL = {torch.float64: dict(rtol=1e-6, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _inputs(B, T, dtype, seed, p_keep=0.6):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    mask = torch.rand(B, T, generator=g) < p_keep
    return values, mask


def naive_token_mean(values, mask, normalizer=None):
    """Returns (value, d value / d values) with explicit loops."""
    B, T = len(values), len(values[0])
    total = sum(values[b][t] for b in range(B) for t in range(T) if mask[b][t])
    n = sum(1 for b in range(B) for t in range(T) if mask[b][t])
    n = n if normalizer is None else normalizer
    n = n if n > 0 else 1
    grad = [[(1.0 / n if mask[b][t] else 0.0) for t in range(T)] for b in range(B)]
    return total / n, grad


def naive_sequence_mean(values, mask, num_sequences=None):
    B, T = len(values), len(values[0])
    means, grad = [], [[0.0] * T for _ in range(B)]
    for b in range(B):
        kept = [t for t in range(T) if mask[b][t]]
        if kept:
            means.append(sum(values[b][t] for t in kept) / len(kept))
    s = len(means) if num_sequences is None else num_sequences
    s = s if s > 0 else 1
    for b in range(B):
        kept = [t for t in range(T) if mask[b][t]]
        for t in kept:
            grad[b][t] = 1.0 / (len(kept) * s)
    return sum(means) / s, grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_token_mean_matches_naive(dtype, seed):
    values, mask = _inputs(4, 9, dtype, seed)
    out = masked_token_mean(values, mask)
    out.backward()
    ref, ref_grad = naive_token_mean(values.tolist(), mask.tolist())
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.tensor(ref, dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(values.grad, torch.tensor(ref_grad, dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_mean_explicit_normalizer_adds_up_over_micro_batches(dtype):
    values, mask = _inputs(6, 11, dtype, seed=7)
    full = masked_token_mean(values, mask)
    n_step = int(mask.sum())
    parts = [
        masked_token_mean(values[i : i + 2], mask[i : i + 2], normalizer=n_step) for i in (0, 2, 4)
    ]
    torch.testing.assert_close(sum(parts), full, **TOL[dtype])
    # gradients add up too: accumulating the micro-batch losses gives the full-batch gradient
    (g_full,) = torch.autograd.grad(full, values)
    (g_acc,) = torch.autograd.grad(sum(parts), values)
    torch.testing.assert_close(g_acc, g_full, **TOL[dtype])
    ref, _ = naive_token_mean(values.tolist(), mask.tolist(), normalizer=n_step)
    torch.testing.assert_close(full, torch.tensor(ref, dtype=dtype), **TOL[dtype])
    # a tensor normalizer works the same
    torch.testing.assert_close(
        masked_token_mean(values, mask, normalizer=torch.tensor(n_step)), full, **TOL[dtype]
    )


def test_token_mean_all_masked_is_zero_with_grad_and_ignores_garbage():
    values = torch.tensor([[math.nan, math.inf], [-math.inf, 1.0]], requires_grad=True)
    mask = torch.zeros(2, 2, dtype=torch.bool)
    out = masked_token_mean(values, mask)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(values.grad, torch.zeros(2, 2))
    # explicit normalizer 0 (nothing kept in the whole step) is also 0
    assert masked_token_mean(values.detach(), mask, normalizer=0).item() == 0.0


def test_token_mean_garbage_in_masked_positions_does_not_leak():
    values = torch.tensor([[1.0, 3.0, math.nan], [2.0, math.inf, -math.inf]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    out = masked_token_mean(values, mask)
    out.backward()
    assert out.item() == pytest.approx(2.0)
    assert torch.equal(values.grad, torch.tensor([[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


def test_token_mean_float_mask_and_bf16():
    values, mask = _inputs(3, 5, torch.float64, seed=1)
    ref = masked_token_mean(values, mask)
    torch.testing.assert_close(masked_token_mean(values, mask.double()), ref)
    out = masked_token_mean(values.detach().bfloat16(), mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_sequence_mean_matches_naive(dtype, seed):
    values, mask = _inputs(5, 8, dtype, seed, p_keep=0.4)
    mask[1] = False  # an empty row neither contributes nor counts
    out = masked_sequence_mean(values, mask)
    out.backward()
    ref, ref_grad = naive_sequence_mean(values.tolist(), mask.tolist())
    torch.testing.assert_close(out, torch.tensor(ref, dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(values.grad, torch.tensor(ref_grad, dtype=dtype), **TOL[dtype])


def test_sequence_mean_adds_up_over_micro_batches():
    values, mask = _inputs(6, 7, torch.float64, seed=3)
    mask[4] = False
    full = masked_sequence_mean(values, mask)
    s_step = int((mask.sum(-1) > 0).sum())
    parts = [
        masked_sequence_mean(values[i : i + 3], mask[i : i + 3], num_sequences=s_step) for i in (0, 3)
    ]
    torch.testing.assert_close(sum(parts), full, **TOL[torch.float64])


def test_sequence_mean_all_masked_is_zero():
    values = torch.full((2, 3), math.nan, requires_grad=True)
    out = masked_sequence_mean(values, torch.zeros(2, 3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.equal(values.grad, torch.zeros(2, 3))


def test_row_mean_matches_naive():
    values, mask = _inputs(4, 6, torch.float64, seed=5)
    mask[2] = False
    ref = []
    for row, m in zip(values.tolist(), mask.tolist()):
        kept = [v for v, k in zip(row, m) if k]
        ref.append(sum(kept) / len(kept) if kept else 0.0)
    expected = torch.tensor(ref, dtype=torch.float64)
    torch.testing.assert_close(masked_row_mean(values, mask), expected)


@st.composite
def hostile(draw):
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    finite = st.floats(-1e4, 1e4, allow_nan=False) | st.sampled_from([-1e4, 1e4, 0.0])
    garbage = st.sampled_from([math.nan, math.inf, -math.inf]) | finite
    mask = draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
    vals = [draw(finite) if m else draw(garbage) for m in mask]
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    values = torch.tensor(vals, dtype=torch.float64).to(dtype).view(B, T)
    return values, torch.tensor(mask).view(B, T)


@settings(max_examples=60, deadline=None)
@given(hostile())
def test_reductions_hostile_inputs_stay_finite(batch):
    values, mask = batch
    for reduce in (masked_token_mean, masked_sequence_mean):
        v = values.clone().requires_grad_()
        out = reduce(v, mask)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(v.grad).all()
        assert v.grad[~mask].eq(0).all()


@pytest.mark.parametrize("reduce", [masked_token_mean, masked_sequence_mean, masked_row_mean])
def test_nan_and_inf_at_masked_positions_reach_neither_value_nor_gradient(reduce):
    values, mask = _inputs(3, 5, torch.float64, seed=90)
    bad = values.detach().clone()
    bad[~mask] = torch.tensor([math.nan, math.inf, -math.inf]).repeat(15)[: int((~mask).sum())].double()
    bad.requires_grad_()
    out, out_clean = reduce(bad, mask), reduce(values, mask)
    (g,) = torch.autograd.grad(out.sum(), bad)
    (g_clean,) = torch.autograd.grad(out_clean.sum(), values)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    torch.testing.assert_close((out, g), (out_clean, g_clean), rtol=0, atol=0)


def test_nan_normalizer_is_refused():
    values, mask = _inputs(2, 3, torch.float64, seed=91)
    with pytest.raises(ValueError, match="normalizer must be >= 0, got nan"):
        masked_token_mean(values, mask, math.nan)
