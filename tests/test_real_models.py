"""`opd train` on Hugging Face models saved to disk and a JSONL dataset (the real-model path)."""

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from opd.cli import main
from run_helpers import word_tokenizer
from opd.run.metrics_log import read_metrics

WORDS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "what", "is", "plus", "answer:"] + [str(i) for i in range(20)]
def make_tokenizer():
    return word_tokenizer(WORDS)


def save_model(path, tokenizer, hidden, vocab=None):
    cfg = Qwen2Config(
        vocab_size=vocab or len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def real_setup(tmp_path):
    tok = make_tokenizer()
    student = save_model(tmp_path / "student", tok, 16)
    teacher = save_model(tmp_path / "teacher", tok, 32)
    rows = [{"prompt": f"what is {a} plus {b}", "answer": str(a + b), "solution": f"{a} plus {b} is {a + b} answer: {a + b}"}
            for a in range(5) for b in range(5)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return student, teacher, data, tmp_path


@pytest.mark.parametrize("method", ["opd", "gkd"])
def test_train_checkpoint_resume_on_real_models(real_setup, method):
    student, teacher, data, tmp = real_setup
    common = [f"method={method}", f"student={student}", f"teacher={teacher}", f"dataset={data}", "prompts_per_step=4",
              "group_size=2", "max_new_tokens=8", "eval_size=4", "eval_k=2", "progress=false", f"run_dir={tmp / 'run'}"]
    assert main(["train", *common, "steps=2"]) == 0
    assert (tmp / "run/checkpoints/step_000002/model.safetensors").exists()
    assert (tmp / "run/checkpoints/step_000002/tokenizer.json").exists()
    assert main(["train", *common, "steps=3", "resume=true"]) == 0
    assert [r["step"] for r in read_metrics(tmp / "run")] == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["opd", "gkd"])
def test_teacher_with_padded_embeddings_trains(real_setup, method):
    """One tokenizer, a teacher head padded past it (as Qwen2.5 7B's 152,064 rows against
    0.5B's 151,936): accepted, both sides cut to the tokenizer's ids."""
    student, _, data, tmp = real_setup
    padded = save_model(tmp / "padded", make_tokenizer(), 32, vocab=len(WORDS) + 40)
    args = [f"method={method}", f"student={student}", f"teacher={padded}", f"dataset={data}", "prompts_per_step=4",
            "group_size=2", "max_new_tokens=8", "eval_size=4", "eval_k=2", "progress=false", f"run_dir={tmp / 'run'}",
            "steps=2"]
    assert main(["train", *args]) == 0
    rows = read_metrics(tmp / "run")
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows if "loss" in r)


def test_mismatched_tokenizers_are_refused(real_setup, capsys):
    student, _, data, tmp = real_setup
    words = list(WORDS)
    words[5], words[6] = words[6], words[5]  # same tokens, two ids swapped: a real mismatch
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    other = save_model(tmp / "other", other_tok, 16)
    code = main(["train", "method=opd", f"student={student}", f"teacher={other}", f"dataset={data}", f"run_dir={tmp / 'r'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "tokenizers differ" in err and "2 with other ids" in err
    assert not (tmp / "r").exists()  # nothing written before the check


def test_teacher_with_fewer_ids_than_the_tokenizer_is_refused(real_setup, capsys):
    student, _, data, tmp = real_setup
    small = save_model(tmp / "small", make_tokenizer(), 16, vocab=len(WORDS) - 3)
    code = main(["train", "method=opd", f"student={student}", f"teacher={small}", f"dataset={data}", f"run_dir={tmp / 'r'}"])
    assert code == 2
    assert "vocabularies differ" in capsys.readouterr().err


def test_dataset_without_solutions_for_sft(real_setup, capsys):
    student, teacher, _, tmp = real_setup
    data = tmp / "nosol.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"what is {i}", "answer": str(i)}) for i in range(10)))
    code = main(["train", "method=sft", f"student={student}", f"teacher={teacher}", f"dataset={data}", f"run_dir={tmp / 'r'}"])
    assert code == 2
    assert "needs reference solutions" in capsys.readouterr().err


def test_bad_dataset_rows_are_named(real_setup, capsys):
    student, teacher, _, tmp = real_setup
    data = tmp / "bad.jsonl"
    data.write_text('{"prompt": "what is 1", "answer": "1"}\n{"question": "x"}\n{"prompt": "what is 2", "answer": "2"}\n')
    code = main(["train", f"student={student}", f"teacher={teacher}", f"dataset={data}", f"run_dir={tmp / 'r'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "'prompt'" in err


def test_unknown_config_key_via_cli(capsys):
    assert main(["train", "lr_rate=3"]) == 2
    err = capsys.readouterr().err
    assert "lr_rate" in err and "'lr'" in err


@pytest.mark.slow
def test_console_script_runs(real_setup):
    student, teacher, data, tmp = real_setup
    out = subprocess.run(
        [sys.executable, "-m", "opd.cli", "train", "method=opd", f"student={student}", f"teacher={teacher}",
         f"dataset={data}", "steps=1", "prompts_per_step=2", "max_new_tokens=4", "eval_size=2", "eval_k=1",
         "progress=false", f"run_dir={tmp / 'cli'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "done:" in out.stdout


def prompt_only(tmp):
    data = tmp / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"what is {i} plus {i}"}) for i in range(10)))
    return data


def test_prompt_only_dataset_trains_opd_and_reports_no_accuracy(real_setup):
    student, teacher, _, tmp = real_setup
    args = ["train", "method=opd", f"student={student}", f"teacher={teacher}", f"dataset={prompt_only(tmp)}",
            "steps=1", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "eval_size=2", "eval_k=1",
            "progress=false", f"run_dir={tmp / 'r'}"]
    assert main(args) == 0
    rows = read_metrics(tmp / "r")
    assert "eval/length" in rows[0] and "eval/accuracy" not in rows[0]


@pytest.mark.parametrize(
    "method, data_kind, message",
    [
        ("scope", "prompts", "needs a verifier"),
        ("srpo", "prompts", "needs a verifier"),
        ("opsd", "nosolution", "needs reference solutions"),
        ("stable_opd", "nosolution", "needs reference solutions"),
    ],
)
def test_unmet_needs_fail_at_start(real_setup, capsys, method, data_kind, message):
    student, teacher, _, tmp = real_setup
    if data_kind == "prompts":
        data = prompt_only(tmp)
    else:
        data = tmp / "nosol.jsonl"
        data.write_text("\n".join(json.dumps({"prompt": f"what is {i}", "answer": str(i)}) for i in range(10)))
    code = main(["train", f"method={method}", f"student={student}", f"teacher={teacher}", f"dataset={data}",
                 f"run_dir={tmp / 'r'}"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp / "r").exists()


def test_sparse_teacher_is_refused_for_full_vocabulary_losses(real_setup, monkeypatch):
    from opd.errors import UserError
    from opd.models.hf import HFTeacher
    from opd.run.setup import build_setup
    from opd.config.train import TrainConfig

    student, teacher, data, tmp = real_setup
    monkeypatch.setattr(HFTeacher, "full_logits", False, raising=False)
    orig_init = HFTeacher.__init__

    def sparse_init(self, *a, **k):
        orig_init(self, *a, **k)
        self.full_logits = False

    monkeypatch.setattr(HFTeacher, "__init__", sparse_init)
    for method in ("tip", "skd", "gkd"):
        cfg = TrainConfig(method=method, student=student, teacher=teacher, dataset=str(data), run_dir=str(tmp / "r"))
        with pytest.raises(UserError, match="full-vocabulary loss"):
            build_setup(cfg)
    build_setup(TrainConfig(method="opd", student=student, teacher=teacher, dataset=str(data), run_dir=str(tmp / "r")))
