"""Lean teacher scoring (packed length buckets, LM head on kept positions in chunks)
against the plain padded full-logits pass."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from opd.batch import make_batch
from opd.models.hf import HFTeacher, completion_logits, scores_from_logits
from opd.models.scoring import lean_scores, plan_buckets, row_spans

V, PAD, EOS = 97, 0, 1
ARCH = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    torch.manual_seed(0)
    if request.param == "llama":
        return LlamaForCausalLM(LlamaConfig(**ARCH)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**ARCH)).eval()


def uneven_batch(seed=0, rows=7, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    p_lens = torch.randint(1, 10, (rows,), generator=g).tolist()
    c_lens = torch.randint(1, 40, (rows,), generator=g).tolist()
    c_lens[0] = 60  # one long row among short ones
    if empty_row:
        c_lens[-1] = 0
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in p_lens]
    comps = [torch.randint(2, V, (n,), generator=g).tolist() for n in c_lens]
    return make_batch(prompts, comps, PAD, width=65)


@torch.no_grad()
def plain_scores(model, batch, topk, temperature):
    """The plain pass: decoder on the padded batch, full [B, T, V] log-softmax."""
    logp_BTV = torch.log_softmax(completion_logits(model, batch).float() / temperature, dim=-1)
    token_BT = logp_BTV.gather(-1, batch.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).nan_to_num().sum(-1)
    return logp_BTV, token_BT, entropy_BT, logp_BTV.topk(min(topk, V), dim=-1)


def assert_same_on(mask_BT, got, ref_logp_BTV, ref_token, ref_entropy, ref_top):
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(got.token_logp_BT[mask_BT], ref_token[mask_BT], **close)
    torch.testing.assert_close(got.entropy_BT[mask_BT], ref_entropy[mask_BT], **close)
    torch.testing.assert_close(got.topk_logp_BTK[mask_BT], ref_top.values[mask_BT], **close)
    # ids compared through their reference log-probs (ties may order differently)
    at_ids = ref_logp_BTV.gather(-1, got.topk_ids_BTK)
    torch.testing.assert_close(at_ids[mask_BT], ref_top.values[mask_BT], **close)


@pytest.mark.parametrize("knobs", [{}, {"max_tokens": 1}, {"call_cost": 10**9}, {"chunk_size": 5}],
                         ids=["default", "row-per-bucket", "one-bucket", "tiny-chunks"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lean_matches_plain_on_kept_positions(model, knobs, temperature):
    batch = uneven_batch()
    got = lean_scores(model, batch, topk=5, temperature=temperature, **knobs)
    mask_BT = batch.completion_mask_BT
    assert got.token_logp_BT.shape == mask_BT.shape and got.topk_ids_BTK.shape == (*mask_BT.shape, 5)
    assert got.logits_BTV is None and got.topk_ids_BTK.dtype == torch.long
    assert_same_on(mask_BT, got, *plain_scores(model, batch, 5, temperature))
    # masked positions: the uniform distribution's scores, finite
    pad = ~mask_BT
    assert torch.equal(got.token_logp_BT[pad], torch.full_like(got.token_logp_BT[pad], -math.log(V)))
    assert torch.equal(got.entropy_BT[pad], torch.full_like(got.entropy_BT[pad], math.log(V)))
    for t in (got.token_logp_BT, got.entropy_BT, got.topk_logp_BTK):
        assert torch.isfinite(t).all()


def test_teacher_default_is_lean_and_full_keeps_every_column(model):
    batch = uneven_batch(seed=1)
    teacher = HFTeacher(model, eos_id=EOS, pad_id=PAD)
    ref = plain_scores(model, batch, 4, 1.0)
    lean = teacher.score(batch, topk=4)
    assert lean.logits_BTV is None
    assert_same_on(batch.completion_mask_BT, lean, *ref)
    full = teacher.score(batch, topk=4, full=True)
    assert full.logits_BTV is None and full.hidden_BTH is not None  # hidden states and head, never [B, T, V]
    torch.testing.assert_close(full.full_logits_BTV(), completion_logits(model, batch), atol=1e-6, rtol=1e-6)
    everywhere = torch.ones_like(batch.completion_mask_BT)
    assert_same_on(everywhere, full, *ref)  # padding columns too (methods read them)


def test_scores_from_logits_chunks_equal_whole():
    g = torch.Generator().manual_seed(0)
    logits_BTV = torch.randn(3, 11, V, generator=g) * 4
    logits_BTV[0, 0, :50] = float("-inf")  # -inf log-probs: entropy stays finite
    tokens_BT = torch.randint(0, V, (3, 11), generator=g)
    whole = scores_from_logits(logits_BTV, tokens_BT, topk=6, full=False, temperature=1.3, chunk_size=10**6)
    parts = scores_from_logits(logits_BTV, tokens_BT, topk=6, full=True, temperature=1.3, chunk_size=4)
    assert parts.logits_BTV is logits_BTV and torch.isfinite(parts.entropy_BT).all()
    for a, b in [(whole.token_logp_BT, parts.token_logp_BT), (whole.entropy_BT, parts.entropy_BT),
                 (whole.topk_logp_BTK, parts.topk_logp_BTK), (whole.topk_ids_BTK, parts.topk_ids_BTK)]:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_rows_without_kept_tokens_cost_nothing(model):
    batch = make_batch([[5, 6], [7]], [[], []], PAD, width=3)
    left_B, span_B = row_spans(batch)
    assert span_B.tolist() == [0, 0]
    got = lean_scores(model, batch, topk=3)
    assert got.topk_ids_BTK.shape == (2, 3, 3) and torch.isfinite(got.entropy_BT).all()


def test_row_spans_cover_prompt_and_predicting_columns():
    batch = make_batch([[5, 6, 7], [8]], [[9, 9], [9, 9, 9, 9]], PAD)
    left_B, span_B = row_spans(batch)
    assert left_B.tolist() == [0, 2]  # first attended prompt column
    assert span_B.tolist() == [3 + 2 - 1, 1 + 4 - 1]  # prompt + completion, last token unread


@pytest.mark.parametrize("spans,max_tokens,call_cost", [
    ([5, 300, 7, 9, 290, 6, 8, 310], 10**6, 50),
    ([40] * 9, 10**6, 1),
    ([17, 3, 250, 60, 61, 4, 4, 120], 200, 10),
])
def test_plan_buckets_is_a_partition_within_budget(spans, max_tokens, call_cost):
    buckets = plan_buckets(spans, max_tokens=max_tokens, call_cost=call_cost)
    assert sorted(b for bucket in buckets for b in bucket) == list(range(len(spans)))
    for bucket in buckets:
        assert len(bucket) == 1 or len(bucket) * max(spans[b] for b in bucket) <= max_tokens
    cost = sum(len(b) * max(spans[i] for i in b) + call_cost for b in buckets)
    assert cost <= len(spans) * max(spans) + call_cost  # never worse than one padded call


def test_plan_buckets_splits_long_from_short():
    assert sorted(map(sorted, plan_buckets([5, 300, 7, 9, 290, 6, 8, 310], call_cost=50))) == [[0, 2, 3, 5, 6], [1, 4, 7]]
    assert len(plan_buckets([40] * 9, call_cost=1)) == 1
