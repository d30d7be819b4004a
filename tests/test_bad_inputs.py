"""Bad models, prompts and failures at the command line: one `opd: error: ...` line with the
fix (exit 2); a bug keeps its traceback plus one line asking for a report (exit 1)."""

import json
import shutil
import time

import pytest
from test_real_models import WORDS, make_tokenizer, save_model
from transformers import GPT2Config, GPT2LMHeadModel

import opd.cli as cli
from opd.cli import main
from opd.errors import UserError
from opd.models import hf
from opd.models.hf import load_model, load_tokenizer
from opd.run.setup import drop_long_prompts, prompt_limit
from opd.tasks.base import Problem

COMMON = ["method=opd", "steps=1", "prompts_per_step=2", "group_size=2", "eval_size=2", "eval_k=1", "progress=false",
          "chat_template=off"]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("opd: error:")]
    assert len(err) == 1
    return err[0]


# --- models -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["./no/such/model", "../no/such", "~/no/such/model", "/no/such/model", "a/b/c"])
def test_a_local_looking_path_that_does_not_exist_says_so(path):
    with pytest.raises(UserError) as err:
        load_model(path, what="student")
    assert str(err.value) == f"student {path}: no such directory; check the path (a hub id looks like org/name)"


def test_a_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_tokenizer("nobody-opd-test/no-such-model", what="teacher")
    assert time.perf_counter() - t0 < 5
    assert str(err.value) == (
        "teacher nobody-opd-test/no-such-model is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "download it where there is a network (hf download nobody-opd-test/no-such-model), unset HF_HUB_OFFLINE, "
        "or give a local directory"
    )


def test_a_hub_id_with_the_hub_unreachable_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    hf._hub_lookup.cache_clear()
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_model("nobody-opd-test/unreachable", what="student")
    hf._hub_lookup.cache_clear()
    assert time.perf_counter() - t0 < hf.HUB_TIMEOUT_S + 2
    message = str(err.value)
    assert message.startswith("student nobody-opd-test/unreachable: the Hugging Face hub is unreachable (")
    assert message.endswith(") and the model is not in the local cache; check the network, or download it where "
                            "there is one and give its directory")


def test_an_unreachable_hub_falls_back_to_a_cached_copy(monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    hf._hub_lookup.cache_clear()
    assert hf.locate("nobody-opd-test/cached", "student") == ("nobody-opd-test/cached", True)
    hf._hub_lookup.cache_clear()
    note = capsys.readouterr().err.splitlines()
    assert len(note) == 1 and note[0].startswith("opd: note: the Hugging Face hub is unreachable (")
    assert note[0].endswith("); loading nobody-opd-test/cached from the local cache")


def test_an_invalid_hub_id():
    with pytest.raises(UserError, match=r"^model my model: neither a local directory nor a valid hub id \(org/name\); check the path$"):
        load_model("my model")


@pytest.fixture
def model_dir(tmp_path):
    return save_model(tmp_path / "m", make_tokenizer(), 16)


def _edit_tokenizer(path, drop):
    """A tokenizer alone (no model config beside it to take an eos from) without ``drop``."""
    make_tokenizer().save_pretrained(path)
    config = path / "tokenizer_config.json"
    cfg = json.loads(config.read_text())
    for key in drop:
        cfg.pop(key, None)
    config.write_text(json.dumps(cfg))
    return str(path)


def test_a_model_directory_without_tokenizer_files(model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{model_dir}/{name}", bare / name)
    with pytest.raises(UserError) as err:
        load_tokenizer(str(bare))
    assert str(err.value) == (
        f"{bare} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); save the tokenizer there "
        "(tokenizer.save_pretrained(DIR)) or copy those files from the model it comes from"
    )


@pytest.mark.parametrize("drop, nor_pad", [(["eos_token"], ""), (["eos_token", "pad_token"], " (nor a pad token)")])
def test_a_tokenizer_without_eos_is_refused(tmp_path, drop, nor_pad):
    path = _edit_tokenizer(tmp_path / "tok", drop)
    with pytest.raises(UserError) as err:
        load_tokenizer(path)
    assert str(err.value) == (
        f"the tokenizer of {path} has no eos token{nor_pad}, so no rollout could end before max_new_tokens; "
        "set \"eos_token\" in its tokenizer_config.json to the model's end-of-text token"
    )


def test_a_tokenizer_without_pad_pads_with_eos_and_says_so(tmp_path, capsys):
    path = _edit_tokenizer(tmp_path / "tok", ["pad_token"])
    tok = load_tokenizer(path)
    assert tok.pad_token_id == tok.eos_token_id == WORDS.index("<eos>")
    assert capsys.readouterr().err.splitlines() == [
        f"opd: note: the tokenizer of {path} has no pad token; padding with its eos token '<eos>'"
    ]


def test_a_damaged_model_file_is_one_line(model_dir):
    with open(f"{model_dir}/model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=f"^cannot load the model from {model_dir}: "):
        load_model(model_dir)


# --- prompt length ------------------------------------------------------------------------


def test_prompt_limit():
    assert prompt_limit(None, 96, None) == (None, "max_prompt_tokens")
    assert prompt_limit(None, 30, 512) == (482, "the model's 512 positions minus max_new_tokens=30; set max_prompt_tokens to choose")
    assert prompt_limit(100, 30, 512) == (100, "max_prompt_tokens")
    assert prompt_limit(100, 30, None) == (100, "max_prompt_tokens")
    with pytest.raises(UserError, match=r"^max_prompt_tokens=500 plus max_new_tokens=30 exceeds the model's 512 positions; "
                                        r"lower one of them \(max_prompt_tokens <= 482\)$"):
        prompt_limit(500, 30, 512)
    with pytest.raises(UserError, match="^max_new_tokens=512 leaves no room for a prompt in the model's 512 positions; "
                                        "set max_new_tokens below 512$"):
        prompt_limit(None, 512, 512)


def test_long_prompts_are_dropped_and_counted():
    problems = [Problem("x " * n, "") for n in (1, 5, 9, 3)]
    kept, dropped = drop_long_prompts(problems, lambda p: p.prompt.split(), 4, "max_prompt_tokens", "training")
    assert [len(p.prompt.split()) for p in kept] == [1, 3] and dropped == 2
    assert drop_long_prompts(problems, None, None, "", "training") == (problems, 0)
    with pytest.raises(UserError, match=r"^all 4 training prompts are longer than 0 tokens \(max_prompt_tokens\); raise"):
        drop_long_prompts(problems, lambda p: p.prompt.split(), 0, "max_prompt_tokens", "training")


@pytest.fixture
def gpt2_setup(tmp_path):
    """A GPT-2-style model with a learned table of 32 positions, and a dataset whose prompts
    are 5 words, or 81 (more than 32 positions)."""
    tok = make_tokenizer()
    cfg = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(model)
    tok.save_pretrained(model)
    rows = [{"prompt": f"what is {a} plus {b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
    rows += [{"prompt": "what is " + " plus ".join([str(i)] * 40), "answer": "0"} for i in range(10)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return str(model), data, tmp_path


def test_prompts_beyond_the_positions_are_dropped_and_reported(gpt2_setup, capsys):
    model, data, tmp = gpt2_setup
    assert main(["train", *COMMON, f"student={model}", f"teacher={model}", f"dataset={data}", "max_new_tokens=8",
                 f"run_dir={tmp / 'r'}"]) == 0
    out = capsys.readouterr()
    note = [line for line in out.err.splitlines() if "longer than" in line]
    assert len(note) == 1 and note[0].startswith("opd: note: dropped ")
    assert note[0].endswith(" prompts (train and held-out) longer than 24 tokens (the model's 32 positions minus "
                            "max_new_tokens=8; set max_prompt_tokens to choose)")


def test_max_new_tokens_beyond_the_positions_is_one_line(gpt2_setup, capsys):
    model, data, tmp = gpt2_setup
    code = main(["train", *COMMON, f"student={model}", f"teacher={model}", f"dataset={data}", "max_new_tokens=40",
                 f"run_dir={tmp / 'r'}"])
    assert code == 2
    assert one_error_line(capsys) == (
        "opd: error: max_new_tokens=40 leaves no room for a prompt in the model's 32 positions; set max_new_tokens below 32"
    )


def test_setup_counts_dropped_prompts_and_duplicates(gpt2_setup):
    from opd.config.train import TrainConfig
    from opd.run.setup import build_setup

    model, data, tmp = gpt2_setup
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("\n".join(json.dumps(r) for r in rows + rows[:16]))  # every short row twice
    cfg = TrainConfig(method="opd", student=model, teacher=model, dataset=str(data), max_new_tokens=8,
                      eval_fraction=0.2, chat_template="off", run_dir=str(tmp / "r"))
    setup = build_setup(cfg)
    counts = setup.data_counts
    assert counts["data/prompts_too_long"] > 0 and counts["data/eval_duplicates"] > 0
    assert all(len(setup.env.encode_prompt(p)) <= 24 for p in setup.train_pool + setup.eval_problems)


# --- the command line ---------------------------------------------------------------------


def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps([{"prompt": "a"}]))
    assert main(["train", f"dataset={data}", f"run_dir={tmp_path / 'r'}"]) == 2
    assert one_error_line(capsys).startswith(f"opd: error: dataset {data}, line 1: an array, not an object; ")
    assert main(["train", "student=./no/such/student", f"run_dir={tmp_path / 'r'}"]) == 2
    assert one_error_line(capsys) == "opd: error: student ./no/such/student: no such directory; check the path (a hub id looks like org/name)"


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something broke inside")

    monkeypatch.setattr(cli, "cmd_methods", broken)
    assert main(["methods"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-2:] == ["RuntimeError: something broke inside",
                        "opd: internal error (a bug): please report it with the traceback above"]


def test_a_prompt_only_run_ends_with_what_was_measured(tmp_path, capsys):
    student = save_model(tmp_path / "s", make_tokenizer(), 16)
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"what is {i} plus {i}"}) for i in range(10)))
    assert main(["train", *COMMON, f"student={student}", f"teacher={student}", f"dataset={data}", "max_new_tokens=4",
                 f"run_dir={tmp_path / 'r'}"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"done: {tmp_path / 'r'}  mean_length=")
    assert last.endswith(" tokens (no answers to check accuracy against)") and "nan" not in last
