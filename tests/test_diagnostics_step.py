"""Per-step diagnostics (opd.run.step_diagnostics): every function against a naive loop
reference in float64, hostile inputs (peaked, -inf, empty masks), and short training runs
whose metrics.jsonl carries the diag/ keys."""

import math

import pytest
import torch

from opd.run.step_diagnostics import (
    LOGP_FLOOR,
    masked_mean,
    position_buckets,
    repetition_metrics,
    student_entropy_BT,
    student_step_stats,
    teacher_disagree_BT,
    teacher_logp_by_position,
    teacher_step_metrics,
    teacher_topk_mass_BT,
    topk_overlap_BT,
)
from opd.run.metrics_log import read_metrics
from opd.run.runner import train
from opd.signals.monitors import repetition_ratio

TOL = dict(rtol=0, atol=1e-6)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mask(B, T, seed):
    lengths = torch.randint(0, T + 1, (B,), generator=_gen(seed))
    return torch.arange(T)[None, :] < lengths[:, None]


def _teacher_topk(B, T, V, K, seed):
    logp_BTV = torch.log_softmax(torch.randn(B, T, V, generator=_gen(seed), dtype=torch.float64) * 2, -1)
    lp, ids = logp_BTV.topk(K, -1)
    return logp_BTV, ids, lp


# --- naive references -------------------------------------------------------------------


def ref_entropy(logits_V):
    z = [float(x) for x in logits_V]
    m = max(z)
    if m == -math.inf:
        return 0.0
    s = sum(math.exp(x - m) for x in z)
    return -sum(math.exp(x - m) / s * ((x - m) - math.log(s)) for x in z if x > -math.inf)


def ref_overlap(s_logits_V, t_ids_K, t_lp_K):
    K = len(t_ids_K)
    order = sorted(range(len(s_logits_V)), key=lambda v: -float(s_logits_V[v]))[: min(K, len(s_logits_V))]
    s_set = {v for v in order if float(s_logits_V[v]) > -math.inf}
    t_set = {int(i) for i, lp in zip(t_ids_K, t_lp_K) if float(lp) > -math.inf}
    return len(s_set & t_set) / K


def ref_masked_mean(vals, mask):
    xs = [float(v) for v, m in zip(vals.flatten(), mask.flatten()) if m]
    return sum(xs) / len(xs) if xs else None


# --- pure functions ---------------------------------------------------------------------


def test_masked_mean_matches_loop_and_ignores_masked_nan():
    vals = torch.randn(3, 7, generator=_gen(0), dtype=torch.float64)
    mask = _mask(3, 7, 1)
    mask[0, 0] = True
    assert masked_mean(vals, mask) == pytest.approx(ref_masked_mean(vals, mask), abs=1e-12)
    vals[~mask] = float("nan")
    assert math.isfinite(masked_mean(vals, mask))
    assert masked_mean(vals, torch.zeros(3, 7, dtype=torch.bool)) is None


@pytest.mark.parametrize("chunk", [1, 5, 1 << 24])
def test_student_entropy_matches_loop(chunk):
    B, T, V = 2, 5, 7
    logits = torch.randn(B, T, V, generator=_gen(2), dtype=torch.float64) * 3
    logits[0, 1] = torch.tensor([50.0, -50.0, -50.0, -50.0, -50.0, -50.0, -50.0])  # peaked
    logits[0, 2, :3] = float("-inf")
    logits[1, 3] = float("-inf")  # no mass at all
    got = student_entropy_BT(logits, chunk=chunk * V)
    ref = torch.tensor([[ref_entropy(logits[b, t]) for t in range(T)] for b in range(B)], dtype=torch.float64)
    torch.testing.assert_close(got, ref, **TOL)
    assert got[1, 3] == 0 and got[0, 1] < 1e-12 and torch.isfinite(got).all()


def test_topk_overlap_matches_loop_with_inf_entries():
    B, T, V, K = 3, 6, 11, 4
    s_logits = torch.randn(B, T, V, generator=_gen(3), dtype=torch.float64)
    _, t_ids, t_lp = _teacher_topk(B, T, V, K, 4)
    t_ids[0, 0] = s_logits[0, 0].topk(K).indices  # full agreement somewhere
    s_logits[1, 1, :-2] = float("-inf")  # only 2 finite student candidates
    t_lp[2, 2, 2:] = float("-inf")  # teacher returned 2 real candidates
    got = topk_overlap_BT(s_logits, t_ids, t_lp)
    ref = torch.tensor(
        [[ref_overlap(s_logits[b, t], t_ids[b, t], t_lp[b, t]) for t in range(T)] for b in range(B)]
    )
    torch.testing.assert_close(got.double(), ref.double(), **TOL)
    assert got[0, 0] == 1.0 and ((got >= 0) & (got <= 1)).all()


def test_topk_overlap_k_larger_than_vocab_and_k_zero():
    s_logits = torch.randn(1, 2, 3, generator=_gen(5))
    t_ids = torch.tensor([[[0, 1, 2, 3, 4]] * 2])
    t_lp = torch.full((1, 2, 5), -1.0)
    torch.testing.assert_close(topk_overlap_BT(s_logits, t_ids, t_lp), torch.full((1, 2), 3 / 5))
    with pytest.raises(ValueError, match="K >= 1"):
        topk_overlap_BT(s_logits, t_ids[..., :0], t_lp[..., :0])


def test_teacher_topk_mass_and_disagree_match_loops():
    B, T, V, K = 2, 5, 9, 3
    _, ids, lp = _teacher_topk(B, T, V, K, 6)
    lp[0, 0, 1:] = float("-inf")
    y = torch.randint(0, V, (B, T), generator=_gen(7))
    y[1, 1] = ids[1, 1, 0]
    mass = teacher_topk_mass_BT(lp)
    dis = teacher_disagree_BT(ids, y)
    for b in range(B):
        for t in range(T):
            assert float(mass[b, t]) == pytest.approx(sum(math.exp(float(x)) for x in lp[b, t]), abs=1e-9)
            assert float(dis[b, t]) == float(int(ids[b, t, 0]) != int(y[b, t]))
    assert dis[1, 1] == 0 and (mass <= 1 + 1e-9).all()


def test_position_buckets():
    assert position_buckets(0) == []
    assert position_buckets(1) == [(0, 16)]
    assert position_buckets(16) == [(0, 16)]
    assert position_buckets(17) == [(0, 16), (16, 32)]
    assert position_buckets(200) == [(0, 16), (16, 32), (32, 64), (64, 128), (128, 256)]
    assert position_buckets(5, first=2) == [(0, 2), (2, 4), (4, 8)]
    with pytest.raises(ValueError):
        position_buckets(4, first=0)


def test_teacher_logp_by_position_matches_loop():
    B, T = 3, 70
    logp = -torch.rand(B, T, generator=_gen(8), dtype=torch.float64) * 5
    logp[0, 3] = float("-inf")
    logp[1, 20] = float("nan")
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 40:] = False  # bucket 64-127 empty, 32-63 partly
    mask[2] = False  # a fully masked row
    got = teacher_logp_by_position(logp, mask)
    assert set(got) == {"diag/teacher_logp@0-15", "diag/teacher_logp@16-31", "diag/teacher_logp@32-63"}
    for lo, hi in [(0, 16), (16, 32), (32, 64)]:
        xs = []
        for b in range(B):
            for t in range(lo, min(hi, T)):
                if mask[b, t]:
                    v = float(logp[b, t])
                    xs.append(LOGP_FLOOR if math.isnan(v) else max(v, LOGP_FLOOR))
        assert got[f"diag/teacher_logp@{lo}-{hi - 1}"] == pytest.approx(sum(xs) / len(xs), abs=1e-9)
    assert all(math.isfinite(v) for v in got.values())
    assert teacher_logp_by_position(logp, torch.zeros(B, T, dtype=torch.bool)) == {}


def test_teacher_step_metrics_keys_and_empty_mask():
    B, T, V, K = 2, 20, 9, 3
    _, ids, lp = _teacher_topk(B, T, V, K, 9)
    y = torch.randint(0, V, (B, T), generator=_gen(10))
    tok = torch.randn(B, T, generator=_gen(11), dtype=torch.float64)
    mask = _mask(B, T, 12)
    mask[0] = True
    got = teacher_step_metrics(tok, ids, lp, y, mask)
    assert got["diag/teacher_topk_mass"] == pytest.approx(ref_masked_mean(teacher_topk_mass_BT(lp), mask), abs=1e-9)
    assert got["diag/teacher_disagree"] == pytest.approx(ref_masked_mean(teacher_disagree_BT(ids, y), mask), abs=1e-9)
    assert "diag/teacher_logp@0-15" in got and "diag/teacher_logp@16-31" in got
    assert teacher_step_metrics(tok, ids, lp, y, torch.zeros(B, T, dtype=torch.bool)) == {}


def test_student_step_stats_zero_outside_mask_and_optional_overlap():
    B, T, V, K = 2, 4, 8, 3
    logits = torch.randn(B, T, V, generator=_gen(13), dtype=torch.float64)
    logits[1, 3] = float("nan")  # garbage at a padded position must not leak
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3] = False
    only = student_step_stats(logits, mask)
    assert set(only) == {"diag/student_entropy"}
    _, ids, lp = _teacher_topk(B, T, V, K, 14)
    both = student_step_stats(logits, mask, ids, lp)
    assert set(both) == {"diag/student_entropy", "diag/topk_overlap"}
    for v in both.values():
        assert torch.isfinite(v).all() and v[1, 3] == 0
    torch.testing.assert_close(both["diag/student_entropy"][0], student_entropy_BT(logits)[0], **TOL)


def test_repetition_metrics_match_monitor():
    loop = [1, 2, 3, 4, 5, 6] * 16
    ids = torch.zeros(3, 96, dtype=torch.long)
    ids[0] = torch.tensor(loop)
    ids[1] = torch.randint(0, 50, (96,), generator=_gen(15))
    mask = torch.ones(3, 96, dtype=torch.bool)
    mask[2] = False  # an empty completion: ratio 0, not repetitive
    got = repetition_metrics(ids, mask)
    ratios = [repetition_ratio(loop), repetition_ratio(ids[1].tolist()), 0.0]
    assert got["diag/repetition"] == pytest.approx(sum(r > 3.0 for r in ratios) / 3, abs=1e-9)
    assert got["diag/compression"] == pytest.approx(sum(ratios) / 3, abs=1e-6)
    assert got["diag/repetition"] == pytest.approx(1 / 3)
    assert repetition_metrics(ids[:0], mask[:0]) == {}


# --- the loop ---------------------------------------------------------------------------

STUDENT_KEYS = ("diag/student_entropy", "diag/repetition", "diag/compression")
TEACHER_KEYS = ("diag/topk_overlap", "diag/teacher_topk_mass", "diag/teacher_disagree", "diag/teacher_logp@0-15")


def _diag_rows(cfg):
    train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir) if "rollout/length" in r]
    assert len(rows) == 2
    return rows


def test_opd_run_logs_diag_keys(tiny_cfg):
    rows = _diag_rows(tiny_cfg(method="opd"))
    for row in rows:
        for key in STUDENT_KEYS + TEACHER_KEYS:
            assert key in row and math.isfinite(row[key]), key
        for key, val in row.items():
            if key.startswith("diag/"):
                assert math.isfinite(val), key
        assert 0 <= row["diag/topk_overlap"] <= 1 and 0 <= row["diag/teacher_topk_mass"] <= 1 + 1e-6
        assert "teacher/entropy" in row and "teacher/token_logp" in row


def test_sft_run_logs_student_side_only(tiny_cfg):
    rows = _diag_rows(tiny_cfg(method="sft"))
    for row in rows:
        for key in STUDENT_KEYS:
            assert key in row and math.isfinite(row[key]), key
        for key in TEACHER_KEYS:
            assert key not in row
        assert not any(k.startswith("diag/teacher_logp") for k in row)
