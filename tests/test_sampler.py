"""The student sampler: same tokens as `generate` when greedy, exact log-probs, layout."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.batch import make_batch
from opd.models.hf import completion_logits
from opd.rollouts.sampler import pick_tokens, sample

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]


def test_greedy_matches_generate(model):
    out = sample(model, PROMPTS, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.0)
    for prompt, completion in zip(PROMPTS, out.batch.completions()):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        assert completion == ref[0, len(prompt):].tolist()[: len(completion)]
        assert len(completion) == 12 or completion[-1] == EOS


def test_sampler_logprobs_equal_a_fresh_forward(model):
    gen = torch.Generator().manual_seed(3)
    out = sample(model, PROMPTS, max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=1.0, generator=gen)
    with torch.no_grad():
        logp_BTV = torch.log_softmax(completion_logits(model, out.batch), -1)
    ref_BT = logp_BTV.gather(-1, out.batch.completion_ids_BT[..., None]).squeeze(-1)
    mask = out.batch.completion_mask_BT
    assert torch.allclose(out.sampler_logp_BT[mask], ref_BT[mask], atol=1e-5)
    assert (out.sampler_logp_BT[~mask] == 0).all()


def test_same_seed_same_samples(model):
    runs = [sample(model, PROMPTS, max_new_tokens=8, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0].batch.input_ids_BL, runs[1].batch.input_ids_BL)


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(pick_tokens(logits, 1.0, 0.7, gen)) for _ in range(200)}
    assert picks == {0, 1}


def test_layout_left_pads_prompts_and_right_pads_completions():
    b = make_batch([[4, 5], [6]], [[7, 2], [8, 9, 2]], pad_id=PAD)
    assert b.input_ids_BL.tolist() == [[4, 5, 7, 2, 0], [0, 6, 8, 9, 2]]
    assert b.prompt_len == 2
    assert b.completion_mask_BT.tolist() == [[True, True, False], [True, True, True]]
    assert b.position_ids_BL[b.attention_mask_BL.bool()].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert b.completions() == [[7, 2], [8, 9, 2]] and b.prompts() == [[4, 5], [6]]
