"""A padded output head cut to the tokenizer's ids (opd.models.head)."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from opd.models.head import head_params, head_rows, restrict_head
from opd.models.sampler import sample

N_IDS, PAD_ROWS = 30, 34


def padded_model(tied: bool = False) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=N_IDS + PAD_ROWS, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied, eos_token_id=1, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # padding rows that would win every draw if they were reachable
        model.get_output_embeddings().weight[N_IDS:] = 50.0 * model.get_output_embeddings().weight[N_IDS:].sign()
    return model


def test_restricted_head_gives_the_tokenizer_width_and_same_leading_logits():
    model = padded_model()
    ids = torch.tensor([[2, 3, 4, 5]])
    full = model(input_ids=ids).logits
    restrict_head(model, N_IDS)
    cut = model(input_ids=ids).logits
    assert full.shape[-1] == N_IDS + PAD_ROWS and cut.shape[-1] == N_IDS
    torch.testing.assert_close(cut, full[..., :N_IDS], rtol=0, atol=0)
    assert head_rows(model.get_output_embeddings()) == N_IDS
    restrict_head(model, N_IDS + PAD_ROWS)  # lifting it restores the full width
    assert model(input_ids=ids).logits.shape[-1] == N_IDS + PAD_ROWS


def test_padding_rows_are_never_sampled():
    model = padded_model()
    prompts = [[2, 3], [4], [5, 6, 7]] * 4
    free = sample(model, prompts, max_new_tokens=6, eos_id=1, pad_id=0, generator=torch.Generator().manual_seed(0))
    assert int(free.batch.completion_ids_BT.max()) >= N_IDS  # the bait works without the restriction
    restrict_head(model, N_IDS)
    for fast in (True, False):
        out = sample(model, prompts, max_new_tokens=6, eos_id=1, pad_id=0, fast=fast,
                     generator=torch.Generator().manual_seed(0))
        assert int(out.batch.completion_ids_BT.max()) < N_IDS


def test_padding_rows_get_no_gradient_and_the_saved_model_is_unchanged(tmp_path):
    for tied in (False, True):
        model = padded_model(tied)
        keys = {k: v.shape for k, v in model.state_dict().items()}
        restrict_head(model, N_IDS)
        weight, bias = head_params(model.get_output_embeddings())
        assert weight.shape[0] == N_IDS and bias is None
        hidden = torch.randn(5, 16)
        torch.log_softmax(hidden @ weight.T, -1)[:, 3].sum().backward()
        grad = model.get_output_embeddings().weight.grad
        assert grad[N_IDS:].abs().max() == 0 and grad[:N_IDS].abs().max() > 0
        assert {k: v.shape for k, v in model.state_dict().items()} == keys
        model.save_pretrained(tmp_path / f"m{tied}")
        again = Qwen2ForCausalLM.from_pretrained(tmp_path / f"m{tied}")
        assert again.get_output_embeddings().weight.shape[0] == N_IDS + PAD_ROWS


def test_fewer_rows_than_ids_is_an_error():
    model = padded_model()
    try:
        restrict_head(model, N_IDS + PAD_ROWS + 1)
    except ValueError as err:
        assert "fewer than" in str(err)
    else:
        raise AssertionError("no error")
