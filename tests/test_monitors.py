"""Rollout monitors (truncation, repetition) against naive references."""

import random
import zlib

import pytest
import torch

from opd.batch import make_batch
from opd.signals.monitors import (
    is_truncated_B,
    repetition_ratio,
    repetition_ratios_B,
    rollout_monitors,
    varint_bytes,
)

EOS, PAD = 2, 0


# --- monitors ------------------------------------------------------------------------


def naive_varint(n):
    groups = []
    while True:
        groups.append(n % 128)
        n //= 128
        if n == 0:
            break
    return bytes([g + 128 for g in groups[:-1]] + [groups[-1]])


def test_varint_bytes_known_values_and_naive():
    assert varint_bytes([0, 127, 128, 300, 16384]) == b"\x00\x7f\x80\x01\xac\x02\x80\x80\x01"
    ids = [random.Random(1).randrange(0, 300_000) for _ in range(200)]
    assert varint_bytes(ids) == b"".join(naive_varint(i) for i in ids)
    with pytest.raises(ValueError):
        varint_bytes([3, -1])


@pytest.mark.parametrize("tail", [None, 1, 7, 40, 1000])
def test_repetition_ratio_matches_naive(tail):
    ids = [random.Random(2).randrange(0, 70_000) for _ in range(97)]
    kept = ids if tail is None else ids[len(ids) - min(tail, len(ids)):]
    raw = b"".join(naive_varint(i) for i in kept)
    assert repetition_ratio(ids, tail=tail) == len(raw) / len(zlib.compress(raw, 9))
    assert repetition_ratio(torch.tensor(ids), tail=tail) == repetition_ratio(ids, tail=tail)
    text = "the cat sat on the mat, " * 9
    kept_text = text if tail is None else text[-tail:]
    assert repetition_ratio(text, tail=tail) == len(kept_text.encode()) / len(zlib.compress(kept_text.encode(), 9))
    assert repetition_ratio(text.encode(), tail=tail) == repetition_ratio(text, tail=tail)


def test_repetition_ratio_separates_loops_from_varied_text():
    rng = random.Random(3)
    varied = [rng.randrange(4, 24) for _ in range(96)]
    loop = [5, 6, 7, 8, 9, 17] * 16
    assert repetition_ratio(varied) < 2.0 < 3.0 < repetition_ratio(loop)
    # only the tail counts: a loop followed by 48 varied tokens is clean at tail=48
    assert repetition_ratio(loop + varied[:48], tail=48) < 2.0 < repetition_ratio(varied[:48] + loop, tail=48)
    assert repetition_ratio([]) == 0.0 and repetition_ratio("") == 0.0
    with pytest.raises(ValueError):
        repetition_ratio([1, 2], tail=0)


def test_truncation_and_row_ratios_match_naive():
    rng = random.Random(4)
    comps = [[rng.randrange(3, 24) for _ in range(rng.randint(1, 9))] for _ in range(6)]
    for b in (0, 2, 3):
        comps[b][-1] = EOS
    batch = make_batch([[1]] * 6, comps, PAD)
    ids, mask = batch.completion_ids_BT, batch.completion_mask_BT
    assert is_truncated_B(ids, mask, EOS).tolist() == [EOS not in c for c in comps]
    assert repetition_ratios_B(ids, mask, tail=5).tolist() == pytest.approx([repetition_ratio(c, 5) for c in comps], rel=1e-6)
    empty = make_batch([[1]], [[]], PAD, width=3)
    assert is_truncated_B(empty.completion_ids_BT, empty.completion_mask_BT, EOS).tolist() == [True]


def test_rollout_monitors_match_naive():
    rng = random.Random(5)
    comps = [[5, 6, 7] * 20, [rng.randrange(3, 24) for _ in range(60)] + [EOS], [9, EOS], [4] * 50]
    trunc = torch.tensor([c[-1] != EOS for c in comps])
    out = rollout_monitors(comps, trunc, rep_threshold=3.0, tail=64)
    ratios = [len(varint_bytes(c[-64:])) / len(zlib.compress(varint_bytes(c[-64:]), 9)) for c in comps]
    assert float(out["monitor/truncation"]) == pytest.approx(2 / 4)
    assert float(out["monitor/repetition"]) == pytest.approx(sum(r > 3.0 for r in ratios) / 4) == 0.5
    assert float(out["monitor/compression"]) == pytest.approx(sum(ratios) / 4, rel=1e-6)
    assert float(out["monitor/length"]) == pytest.approx(sum(map(len, comps)) / 4)
    none = rollout_monitors([], torch.zeros(0, dtype=torch.bool), rep_threshold=3.0)
    assert all(float(v) == 0.0 for v in none.values())
