"""The student sampler: same tokens as `generate` when greedy, exact log-probs, layout;
the direct Llama-family decoder against the generic HF one; the inverse-CDF draw."""

import inspect
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
    MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

from opd.batch import make_batch
from opd.models.hf import completion_logits
from opd.models import sampler
from opd.models.sampler import Decoder, draw, pick_tokens, sample

EOS, PAD = 2, 0
SMALL = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS, pad_token_id=PAD)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


def _saved(folder, cls, config):
    torch.manual_seed(0)
    net = cls(config)
    for name, p in net.named_parameters():  # biases too (Qwen2's qkv), and a non-trivial norm
        if name.endswith("bias") or "norm" in name:
            torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.3)
    net.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_model(request, tmp_path_factory):
    """A Llama-shaped (untied head) or Qwen2-shaped (tied head, qkv bias) model, from disk."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        return _saved(folder, LlamaForCausalLM, LlamaConfig(**SMALL, tie_word_embeddings=False))
    return _saved(folder, Qwen2ForCausalLM, Qwen2Config(**SMALL, tie_word_embeddings=True))


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3]]


def test_greedy_matches_generate(model):
    out = sample(model, PROMPTS, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.0)
    for prompt, completion in zip(PROMPTS, out.batch.completions()):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        assert completion == ref[0, len(prompt):].tolist()[: len(completion)]
        assert len(completion) == 12 or completion[-1] == EOS


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_matches_generate_on_saved_models(family_model, fast):
    assert Decoder(family_model, PROMPTS, PAD, max_new_tokens=16, fast=fast).path == ("fast" if fast else "hf")
    out = sample(family_model, PROMPTS, max_new_tokens=16, eos_id=EOS, pad_id=PAD, temperature=0.0, fast=fast)
    for prompt, completion in zip(PROMPTS, out.batch.completions()):
        ref = family_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=EOS,
                                    pad_token_id=PAD)
        assert completion == ref[0, len(prompt):].tolist()[: len(completion)]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_fast_and_hf_decoders_sample_the_same(family_model, temperature, top_p):
    """Same seed, same tokens; log-probs within 1e-4; EOS rows stop (uneven left-padded prompts)."""
    runs = [
        sample(family_model, PROMPTS, max_new_tokens=30, eos_id=EOS, pad_id=PAD, temperature=temperature, top_p=top_p,
               generator=torch.Generator().manual_seed(4), fast=fast)
        for fast in (True, False)
    ]
    assert torch.equal(runs[0].batch.input_ids_BL, runs[1].batch.input_ids_BL)
    assert torch.equal(runs[0].batch.completion_mask_BT, runs[1].batch.completion_mask_BT)
    assert (runs[0].sampler_logp_BT - runs[1].sampler_logp_BT).abs().max() <= 1e-4
    lengths = runs[0].batch.completion_mask_BT.sum(1)
    assert lengths.min() < 30, "no row reached EOS: the EOS path is not exercised"


def test_dropping_finished_rows_changes_nothing(family_model, monkeypatch):
    """Compaction of finished rows gives the tokens and log-probs of decoding them all."""
    kw = dict(max_new_tokens=30, eos_id=EOS, pad_id=PAD, temperature=1.0)
    prompts = PROMPTS * 3
    calls = []
    keep_rows = Decoder.keep_rows
    monkeypatch.setattr(Decoder, "keep_rows", lambda self, rows: calls.append(len(rows)) or keep_rows(self, rows))
    compact = sample(family_model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    assert calls, "no row was dropped: the compaction path is not exercised"
    monkeypatch.setattr(sampler, "_worth_compacting", lambda n_done, n_active: False)
    full = sample(family_model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(compact.batch.input_ids_BL, full.batch.input_ids_BL)
    assert (compact.sampler_logp_BT - full.sampler_logp_BT).abs().max() <= 1e-5


def test_decoder_without_a_length_grows_its_cache(family_model):
    """Used by teacher-mixed sampling: no length given, the static cache doubles as needed."""
    fast, hf = Decoder(family_model, PROMPTS, PAD), Decoder(family_model, PROMPTS, PAD, fast=False)
    assert fast.path == "fast"
    live = torch.tensor([True, True, False, True])
    for step in range(12):
        assert torch.allclose(fast.logits_BV, hf.logits_BV, atol=1e-5)
        tok = torch.tensor([4 + step, 5, 6, 7 + step])
        fast.advance(tok, live)
        hf.advance(tok, live)
    assert torch.allclose(fast.logits_BV, hf.logits_BV, atol=1e-5)


def test_fallback_for_unsupported_configs(tmp_path):
    """Length-dependent RoPE, a sliding window shorter than the sequence, another architecture."""
    torch.manual_seed(0)
    dynamic = LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                     "rope_theta": 10000.0})).eval()
    window = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=8)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2, eos_token_id=EOS,
                                      pad_token_id=PAD)).eval()
    for net in (dynamic, window, gpt2):
        dec = Decoder(net, PROMPTS, PAD, max_new_tokens=10)
        assert dec.path == "hf" and dec.fallback
        out = sample(net, PROMPTS, max_new_tokens=6, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0))
        assert out.batch.completion_mask_BT.any(1).all()
        greedy = sample(net, PROMPTS, max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.0)
        for prompt, completion in zip(PROMPTS, greedy.batch.completions()):
            ref = net.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
            assert completion == ref[0, len(prompt):].tolist()[: len(completion)]
    assert Decoder(window, PROMPTS, PAD, max_new_tokens=3).path == "fast"  # 5 + 3 tokens fit the window


def test_cache_argument_follows_the_decoders_signature(family_model):
    """transformers renamed the decoder's ``past_key_values`` to ``cache``; the generic decoder
    passes its cache under the name the installed version takes (a wrong name is silently ignored)."""

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs): ...

    assert sampler.cache_argument(Old()) == "past_key_values" and sampler.cache_argument(New()) == "cache"
    decoder = family_model.get_decoder()
    assert sampler.cache_argument(decoder) in inspect.signature(decoder.forward).parameters


def test_scaled_rope_takes_the_fast_path(tmp_path):
    cfg = LlamaConfig(**SMALL, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})
    net = _saved(tmp_path, LlamaForCausalLM, cfg)
    runs = [sample(net, PROMPTS, max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.0, fast=f) for f in (1, 0)]
    assert torch.equal(runs[0].batch.input_ids_BL, runs[1].batch.input_ids_BL)
    assert (runs[0].sampler_logp_BT - runs[1].sampler_logp_BT).abs().max() <= 1e-4


def test_sampler_logprobs_equal_a_fresh_forward(model):
    gen = torch.Generator().manual_seed(3)
    out = sample(model, PROMPTS, max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=1.0, generator=gen)
    with torch.no_grad():
        logp_BTV = torch.log_softmax(completion_logits(model, out.batch), -1)
    ref_BT = logp_BTV.gather(-1, out.batch.completion_ids_BT[..., None]).squeeze(-1)
    mask = out.batch.completion_mask_BT
    assert torch.allclose(out.sampler_logp_BT[mask], ref_BT[mask], atol=1e-5)
    assert (out.sampler_logp_BT[~mask] == 0).all()
    assert not out.sampler_logp_BT.is_inference() and not out.batch.input_ids_BL.is_inference()


def test_same_seed_same_samples(model):
    runs = [sample(model, PROMPTS, max_new_tokens=8, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0].batch.input_ids_BL, runs[1].batch.input_ids_BL)


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(pick_tokens(logits, 1.0, 0.7, gen)) for _ in range(200)}
    assert picks == {0, 1}


def test_draw_follows_the_distribution(monkeypatch):
    """Frequencies within 5 standard deviations, small and zero probabilities included; the
    vocabulary spans several blocks and is not a multiple of the block."""
    monkeypatch.setattr(sampler, "BLOCK", 8)
    V = 3 * 8 + 5
    w = torch.zeros(V)
    w[[0, 5, 8 + 3, 16 + 7, V - 1]] = torch.tensor([0.5, 0.25, 0.15, 0.099, 1e-3])
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(draw(w.expand(n, V).contiguous(), u), minlength=V).double()
    p = w.double() / w.sum()
    assert counts[w == 0].sum() == 0
    assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt()).all()


def test_draw_edges_pick_positive_tokens_only():
    w = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0, 0.0]] * 2)
    u = torch.tensor([0.0, 1.0 - 2.0**-53], dtype=torch.float64)
    assert draw(w, u).tolist() == [4, 1]  # u = 0: the last positive token; u -> 1: the first


def test_nan_logits_raise():
    with pytest.raises(ValueError):
        pick_tokens(torch.tensor([[0.0, math.nan]]), 1.0, 1.0, None)


def test_layout_left_pads_prompts_and_right_pads_completions():
    b = make_batch([[4, 5], [6]], [[7, 2], [8, 9, 2]], pad_id=PAD)
    assert b.input_ids_BL.tolist() == [[4, 5, 7, 2, 0], [0, 6, 8, 9, 2]]
    assert b.prompt_len == 2
    assert b.completion_mask_BT.tolist() == [[True, True, False], [True, True, True]]
    assert b.position_ids_BL[b.attention_mask_BL.bool()].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert b.completions() == [[7, 2], [8, 9, 2]] and b.prompts() == [[4, 5], [6]]


@pytest.mark.parametrize("step", ["static", "graph"])
def test_static_step_samples_what_the_dynamic_step_samples(family_model, step):
    """The fixed-shape step (what a CUDA graph replays; "graph" on a CPU runs it eagerly)
    writes its column through an index and attends over the whole capacity under the mask:
    same tokens, log-probs within float rounding, with EOS rows and compaction on the way."""
    kw = dict(max_new_tokens=30, eos_id=EOS, pad_id=PAD, temperature=1.0)
    dynamic = sample(family_model, PROMPTS * 3, generator=torch.Generator().manual_seed(6), step="dynamic", **kw)
    fixed = sample(family_model, PROMPTS * 3, generator=torch.Generator().manual_seed(6), step=step, **kw)
    assert torch.equal(dynamic.batch.input_ids_BL, fixed.batch.input_ids_BL)
    assert (dynamic.sampler_logp_BT - fixed.sampler_logp_BT).abs().max() <= 1e-5
    assert dynamic.batch.completion_mask_BT.sum(1).min() < 30


def test_static_step_logits_match_step_by_step(family_model):
    dyn = Decoder(family_model, PROMPTS, PAD, max_new_tokens=12, step="dynamic")
    fix = Decoder(family_model, PROMPTS, PAD, max_new_tokens=12, step="static")
    assert fix.impl.step == "static" and dyn.impl.step == "dynamic"
    live = torch.tensor([True, True, False, True])
    for t in range(12):
        torch.testing.assert_close(fix.logits_BV, dyn.logits_BV, atol=1e-5, rtol=0)
        tok = torch.tensor([4 + t, 5, 6, 7 + t])
        dyn.advance(tok, live)
        fix.advance(tok, live)
    torch.testing.assert_close(fix.logits_BV, dyn.logits_BV, atol=1e-5, rtol=0)


def test_autocast_decodes_with_weights_cast_once(family_model):
    """Under bf16 autocast (a student with float32 master weights) the direct decoder reads
    bf16 copies of the weights made once per rollout: it picks the tokens a bf16 copy of the
    model picks, and never casts per step."""
    import copy

    bf16 = copy.deepcopy(family_model).to(torch.bfloat16)
    kw = dict(max_new_tokens=16, eos_id=EOS, pad_id=PAD, temperature=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dec = Decoder(family_model, PROMPTS, PAD, max_new_tokens=16)
        assert dec.impl.dtype == torch.bfloat16 and dec.impl.k_LBKCd.dtype == torch.bfloat16
        auto = sample(family_model, PROMPTS, **kw)
    native = sample(bf16, PROMPTS, **kw)
    assert torch.equal(auto.batch.input_ids_BL, native.batch.input_ids_BL)
    assert next(family_model.parameters()).dtype == torch.float32  # the model itself is untouched
