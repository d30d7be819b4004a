"""No method builds a ``[B, T, V]`` tensor in a training step (issue: a 152k vocabulary).

Every method with a teacher trains one step on Hugging Face models (a word-level tokenizer
of V = 997 ids, no length near it) with the chunk sizes cut to a few positions, under a
dispatch mode that records every operator's output: a tensor whose last dimension is V and
which holds more than ``LIMIT`` positions' worth of V values would be one made for the whole
batch. The self-test shows the detector catches the full-logits view.
"""

import json
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from opd.config.train import TrainConfig
from opd.losses import chunked
from opd.methods import METHODS, build_method
from opd.run.loop import make_optimizer, pick_problems, step_generator, student_view, train_step
from opd.run.setup import build_setup
from run_helpers import word_tokenizer

V = 997
LIMIT = 24  # positions: chunks hold at most 8; the batch holds about 8 rows x 12 columns
WORDS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "what", "is", "plus", "answer:"] + [str(i) for i in range(20)]
WORDS += [f"filler{i}" for i in range(V - len(WORDS))]


def _tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def models_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("never_btv")
    tok = _tokenizer()
    paths = {}
    for name, hidden in (("student", 16), ("teacher", 24)):
        torch.manual_seed(len(name))
        cfg = Qwen2Config(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        Qwen2ForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    rows = [{"prompt": f"what is {a} plus {b}", "answer": str(a + b), "solution": f"{a} plus {b} is {a + b} answer: {a + b}"}
            for a in range(6) for b in range(6)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    paths["dataset"] = str(root / "data.jsonl")
    return paths


class WholeBatchVocab(TorchDispatchMode):
    """Records operators whose output has last dimension ``V`` and more than ``LIMIT`` rows of it."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V and t.numel() > LIMIT * V:
                where = [f"{f.filename.split('/src/')[-1]}:{f.lineno}" for f in traceback.extract_stack() if "/opd/" in f.filename]
                self.seen.append((str(func), tuple(t.shape), where[-2:]))
        return out


def _setup(paths, method, tmp_path, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 8 * V)  # chunks of 8 positions
    cfg = TrainConfig(method=method, student=paths["student"], teacher=paths["teacher"], dataset=paths["dataset"],
                      prompts_per_step=4, group_size=2, micro_batch_size=3, max_new_tokens=10, eval_size=2,
                      run_dir=str(tmp_path / "run"), progress=False, lmbda=1.0, horizon_frac=1.0, popd_start_frac=1.0)
    return cfg, build_setup(cfg)


TEACHER_METHODS = sorted(n for n in METHODS if build_method(n, {}).teacher_request is not None)


@pytest.mark.parametrize("method", TEACHER_METHODS)
def test_no_step_tensor_spans_the_batch_and_the_vocabulary(method, models_and_data, tmp_path, monkeypatch):
    cfg, setup = _setup(models_and_data, method, tmp_path, monkeypatch)
    generator = step_generator(0, 0)
    problems = pick_problems(setup.train_pool, cfg.prompts_per_step, generator)
    optimizer = make_optimizer(setup.env.student, 1e-3, 0.0)
    with WholeBatchVocab() as watch:
        metrics, _ = train_step(setup.env, setup.method, problems, generator, optimizer, micro_batch_size=3,
                                max_grad_norm=1.0, ppo_epochs=1)
    assert metrics["rollout/length"] >= 4, "rollouts too short to tell a chunk from the batch"
    assert not watch.seen, watch.seen[:5]


def test_the_detector_sees_full_logits(models_and_data, tmp_path, monkeypatch):
    cfg, setup = _setup(models_and_data, "gkd", tmp_path, monkeypatch)
    generator = step_generator(0, 0)
    exp = setup.method.rollout(setup.env, pick_problems(setup.train_pool, 4, generator), generator)
    with WholeBatchVocab() as watch:
        student_view(setup.env.student, exp.batch).logits_BTV  # the eager full logits of the batch
    assert watch.seen
