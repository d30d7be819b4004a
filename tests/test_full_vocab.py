"""The chunked full-vocabulary divergence of a student view against a teacher in a signal
(opd.methods.full_vocab) equals the full-logits form, for a model teacher (hidden states and
head) and a program teacher (logits), in values and gradients; a padded head is cut."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from opd.batch import make_batch
from opd.losses import divergence
from opd.methods.base import StudentView
from opd.methods.full_vocab import teacher_divergence_BT
from opd.models.head import restrict_head
from opd.models.hf import HFTeacher, completion_hidden, completion_logits, scores_from_logits
from opd.signals.teacher_logp import floored_logp_V, full_teacher

N_IDS = 40


def _model(hidden: int, rows: int, seed: int):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).double().eval()


def _batch():
    return make_batch([[3, 4, 5], [6], [7, 8]], [[9, 10, 11, 12], [13], [14, 15, 16]], pad_id=0)


@pytest.mark.parametrize("kind, kw", [("jsd", dict(beta=0.5)), ("rkl", {}), ("fkl", dict(temperature=2.0)),
                                      ("rkl", dict(entry_clip=0.02))])
@pytest.mark.parametrize("padded", [False, True])
def test_model_teacher_chunked_equals_full_logits(kind, kw, padded):
    student = _model(16, N_IDS + (8 if padded else 0), 0)
    teacher = _model(24, N_IDS + (24 if padded else 0), 1)
    if padded:  # padded heads cut to the tokenizer's ids, as set-up does
        restrict_head(student, N_IDS), restrict_head(teacher, N_IDS)
    batch = _batch()
    scores = HFTeacher(teacher, eos_id=1, pad_id=0).score(batch, topk=4, full=True)
    assert scores.logits_BTV is None and scores.hidden_BTH is not None  # never [B, T, V] from a model teacher
    ref_scores = scores_from_logits(completion_logits(teacher, batch), batch.completion_ids_BT, topk=4, full=True, temperature=1.0)
    torch.testing.assert_close(scores.token_logp_BT, ref_scores.token_logp_BT)
    torch.testing.assert_close(scores.full_logits_BTV(), ref_scores.logits_BTV)
    signal = full_teacher(scores)

    lean_view = StudentView.from_hidden(completion_hidden(student, batch), student.get_output_embeddings(),
                                        batch.completion_ids_BT, chunk_size=3)
    lean = teacher_divergence_BT(lean_view, signal, kind, **kw)
    assert not lean_view.has_logits  # the student's full logits were never made
    (lean * batch.completion_mask_BT).sum().backward()
    g_lean = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    teacher_BTV = teacher.get_output_embeddings()(completion_hidden(teacher, batch))  # float64, the naive form
    full = divergence(student.get_output_embeddings()(completion_hidden(student, batch)), floored_logp_V(teacher_BTV), kind, **kw)
    (full * batch.completion_mask_BT).sum().backward()
    g_full = [p.grad.clone() for p in student.parameters()]
    mask = batch.completion_mask_BT
    torch.testing.assert_close(lean[mask], full[mask], rtol=1e-8, atol=1e-10)
    for a, b in zip(g_lean, g_full):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_program_teacher_logits_take_the_same_path():
    student = _model(16, N_IDS, 0)
    batch = _batch()
    logits = torch.randn(3, 4, N_IDS, dtype=torch.float64) * 4
    view = StudentView.from_hidden(completion_hidden(student, batch), student.get_output_embeddings(), batch.completion_ids_BT,
                                   chunk_size=2)
    lean = teacher_divergence_BT(view, {"teacher_logits_BTV": logits}, "jsd", beta=0.3)
    full = divergence(student.get_output_embeddings()(completion_hidden(student, batch)), floored_logp_V(logits), "jsd", beta=0.3)
    torch.testing.assert_close(lean, full, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_logits_at_ids_equals_full_logits_gathered(bias, monkeypatch):
    from opd.losses import selective
    from opd.losses.selective import logits_at_ids

    monkeypatch.setattr(selective, "ROWS_ELEMENTS", 40)  # several chunks of positions
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ids = torch.randint(0, 30, (13, 4), generator=g)
    ids[0] = 7  # repeated ids: their gradients add up
    up = torch.randn(13, 4, generator=g, dtype=torch.float64)
    got = logits_at_ids(h, W, ids, bias_V=b)
    want = torch.nn.functional.linear(h, W, b).gather(-1, ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    inputs = (h, W) + ((b,) if bias else ())
    for a, c in zip(torch.autograd.grad((got * up).sum(), inputs), torch.autograd.grad((want * up).sum(), inputs)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_full_scores_in_row_groups_equal_one_pass():
    teacher = _model(24, N_IDS, 1)
    batch = _batch()
    whole = HFTeacher(teacher, eos_id=1, pad_id=0).score(batch, topk=4, full=True)
    grouped = HFTeacher(teacher, eos_id=1, pad_id=0, bucket_tokens=8).score(batch, topk=4, full=True)  # one row per call
    torch.testing.assert_close(grouped.hidden_BTH, whole.hidden_BTH, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grouped.token_logp_BT, whole.token_logp_BT, rtol=1e-10, atol=1e-12)


def _scored(seed=1):
    """A model teacher's full scores of the batch (hidden states and head), with a few ties."""
    teacher = _model(24, N_IDS, seed)
    batch = _batch()
    return batch, HFTeacher(teacher, eos_id=1, pad_id=0).score(batch, topk=4, full=True)


@pytest.mark.parametrize("with_token", [False, True])
def test_teacher_support_ids_equal_the_full_mask(with_token):
    """The tied top-K support as ids ``[B, T, K']``, 2 positions per chunk of 12, equals the
    ``[B, T, V]`` mask of the naive form, with the teacher's floored log-probs there."""
    from opd.methods.full_vocab import teacher_support_BTK
    from opd.signals.topk_lsm import teacher_support

    batch, scores = _scored()
    tokens = batch.completion_ids_BT if with_token else None
    ids, logp = teacher_support_BTK(full_teacher(scores), tuple(batch.completion_ids_BT.shape), 3, tokens, chunk_size=2)
    full_logp = floored_logp_V(scores.dist.full_logits())  # float64, as the chunks
    mask = teacher_support(full_logp, 3, tokens)
    valid = logp > float("-inf")
    got = torch.zeros(mask.shape, dtype=torch.long).scatter_add(-1, ids, valid.long()) > 0
    assert torch.equal(got, mask) and int(valid.sum()) == int(mask.sum())  # the same ids, each once
    # float64 rounding only: a chunk of 2 positions and the whole [B, T, V] reduce the
    # log-softmax in a different order on some CPUs (1-2 ulps, 4.4e-16, measured on an AMD
    # EPYC; bit-equal on others); a wrong id or a wrong position is off by far more
    torch.testing.assert_close(logp[valid], full_logp.gather(-1, ids)[valid], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_support_divergence_from_ids_equals_the_full_mask_form(kind, monkeypatch):
    """top-K LSM's / EOPD's loss: the student's logits gathered at the support ids (2 positions
    per chunk) against the masked full-logits form, values and gradients (float64)."""
    from opd.losses import selective
    from opd.methods.full_vocab import support_divergence_BTK, teacher_support_BTK
    from opd.methods.topk_lsm import support_divergence
    from opd.signals.topk_lsm import teacher_support

    monkeypatch.setattr(selective, "ROWS_ELEMENTS", 2 * 4 * 16)
    batch, scores = _scored()
    student = _model(16, N_IDS, 0)
    ids, logp = teacher_support_BTK(full_teacher(scores), tuple(batch.completion_ids_BT.shape), 3, chunk_size=2)
    view = StudentView.from_hidden(completion_hidden(student, batch), student.get_output_embeddings(), batch.completion_ids_BT)
    lean = support_divergence_BTK(view, ids, logp.double(), kind)
    assert not view.has_logits
    mask = batch.completion_mask_BT
    (lean * mask).sum().backward()
    g_lean = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    full_logp = floored_logp_V(scores.dist.full_logits())
    full_s = student.get_output_embeddings()(completion_hidden(student, batch))
    full = support_divergence(full_s, full_logp, teacher_support(full_logp, 3), kind)
    (full * mask).sum().backward()
    torch.testing.assert_close(lean[mask], full[mask], rtol=1e-9, atol=1e-12)
    for a, p in zip(g_lean, student.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-8, atol=1e-12)


def test_per_position_statistics_equal_the_full_logits():
    """Prune-OPD's tied top-K overlap and suffix fade's candidate log-probs, made 2 positions
    at a time from the teacher's hidden states and head, equal the naive ``[B, T, V]`` form."""
    from opd.methods.full_vocab import per_position
    from opd.signals.prune import tied_topk_overlap_BT
    from opd.signals.suffix_fade import candidate_logp_BTK

    batch, scores = _scored()
    signal = full_teacher(scores)
    student_ids = torch.randint(0, N_IDS, (*batch.completion_ids_BT.shape, 4), generator=torch.Generator().manual_seed(0))
    overlap = per_position(signal, lambda t_CV, ids_CK: tied_topk_overlap_BT(ids_CK, t_CV), student_ids, chunk_size=2)
    cand = per_position(signal, candidate_logp_BTK, student_ids, floored=False, chunk_size=2)
    full = scores.dist.full_logits()  # float64, as the chunks
    torch.testing.assert_close(overlap, tied_topk_overlap_BT(student_ids, floored_logp_V(full)), rtol=0, atol=0)
    torch.testing.assert_close(cand, candidate_logp_BTK(full, student_ids), rtol=1e-12, atol=1e-12)


def test_frozen_student_statistics_and_tip_signal_equal_the_full_logits(monkeypatch):
    """The frozen student's entropy and top-K ids (Prune-OPD, suffix fade) and TIP's entropy and
    reverse KL to the teacher, in chunks of 2 positions, equal the naive form."""
    from types import SimpleNamespace

    from opd.losses import chunked
    from opd.methods.full_vocab import frozen_student_stats, teacher_of
    from opd.methods.tip import student_entropy_rkl
    from opd.signals.teacher_logp import Head

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 2 * N_IDS)  # 2 positions per chunk
    batch, scores = _scored()
    student = _model(16, N_IDS, 0)
    entropy, top = frozen_student_stats(student, batch, topk=3)
    logp = torch.log_softmax(completion_logits(student, batch).double(), -1)
    torch.testing.assert_close(entropy.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(top, logp.topk(3, -1).indices)
    exp = SimpleNamespace(batch=batch, extra={"student_hidden_BTH": completion_hidden(student, batch).detach(),
                                               "student_head": Head(student.get_output_embeddings().weight.detach(), None)})
    h, d = student_entropy_rkl(exp, teacher_of(full_teacher(scores)))
    full_t = floored_logp_V(scores.full_logits_BTV().double())
    torch.testing.assert_close(h.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.double(), divergence(logp, full_t, "rkl"), rtol=1e-5, atol=1e-6)
