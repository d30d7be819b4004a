from transformers import PreTrainedTokenizerFast

from opd.testbed.tasks import make_task
from opd.testbed.tokenizer import VOCAB, build_tokenizer, load_tokenizer, save_tokenizer


def test_vocab_small_and_ordered():
    tok = build_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == len(VOCAB) < 64
    assert tok.convert_tokens_to_ids(VOCAB) == list(range(len(VOCAB)))
    specials = (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token)
    assert specials == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert tok.convert_tokens_to_ids([str(d) for d in range(10)]) == list(range(4, 14))


def test_encode_decode_round_trip_without_added_specials():
    tok = build_tokenizer()
    for name in ("addition", "modchain"):
        for p in make_task(name, 5).problems("train", 20, 0):
            for text in (p.prompt, p.solution, p.solution + " wait ans " + p.answer):
                ids = tok(text).input_ids
                assert len(ids) == len(text.split())  # no bos/eos added, one id per word
                assert tok.unk_token_id not in ids
                assert tok.decode(ids) == text
    ids = tok("ans 3").input_ids + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids) == "ans 3 <eos> <pad>"
    assert tok.decode(ids, skip_special_tokens=True) == "ans 3"
    assert tok("hello 3").input_ids == [tok.unk_token_id, tok.convert_tokens_to_ids("3")]


def test_save_and_load_round_trip(tmp_path):
    tok = save_tokenizer(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    also = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    text = "mod 7 start 3 + 4 = 0 wait 3 + 4 = 0 ; ans 0"
    for t in (loaded, also):
        assert isinstance(t, PreTrainedTokenizerFast)
        assert t.get_vocab() == tok.get_vocab()
        assert (t.eos_token_id, t.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
        assert t.padding_side == "left"
        assert t(text).input_ids == tok(text).input_ids
        assert t.decode(tok(text).input_ids) == text
    batch = loaded(["add 1 + 2 =", "mod 5 start 1 + 2 ="], padding=True)
    assert batch["input_ids"][0][:3] == [tok.pad_token_id] * 2 + [tok.convert_tokens_to_ids("add")]
