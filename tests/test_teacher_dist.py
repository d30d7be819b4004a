"""TeacherDist: a teacher's full distribution as logits or hidden states and a head, made a chunk
of positions at a time; its vocabulary restriction; the chunked divergence against it."""

import pytest
import torch

from opd.losses.chunked import chunked_divergence
from opd.losses.divergence import divergence
from opd.losses.teacher_dist import TeacherDist
from opd.models.base import Scores
from opd.signals.teacher_logp import floored_logp_V

B, T, H, V = 2, 5, 6, 19


def _randn(*shape, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _head_dist(bias=True, dtype=torch.float64):
    return TeacherDist(hidden=_randn(B, T, H, seed=1, dtype=dtype), weight_VH=_randn(V, H, seed=2, scale=2.0),
                       bias_V=_randn(V, seed=3) if bias else None)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 10, 64])
def test_chunks_are_the_full_logits(bias, chunk):
    dist = _head_dist(bias)
    want = torch.nn.functional.linear(dist.hidden, dist.weight_VH, dist.bias_V)
    assert dist.vocab == V and dist.positions == B * T and tuple(dist.lead_shape) == (B, T)
    got = torch.cat([x for _, _, x in dist.chunks(chunk)]).view(B, T, V)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist.full_logits(), want, rtol=1e-12, atol=1e-12)
    logits = TeacherDist(logits=want.float())
    assert all(x.dtype == torch.float32 for _, _, x in logits.chunks(chunk))
    torch.testing.assert_close(torch.cat([x for _, _, x in logits.chunks(chunk)]).view(B, T, V), want.float())


def test_a_bf16_teacher_matmul_runs_in_its_hidden_dtype():
    dist = _head_dist(dtype=torch.bfloat16)  # bf16 hidden states, a float64 head: cast once, to bf16
    want = torch.nn.functional.linear(dist.hidden, dist.weight_VH.bfloat16(), dist.bias_V.bfloat16()).float()
    torch.testing.assert_close(dist.full_logits(), want, rtol=0, atol=0)
    assert dist.full_logits().dtype == torch.float32


def test_restricted_keeps_the_first_ids():
    """The vocabulary restriction hook: a head padded past the tokenizer cut to its first n rows."""
    for dist in (_head_dist(), TeacherDist(logits=_randn(B, T, V, seed=4))):
        cut = dist.restricted(11)
        assert cut.vocab == 11
        torch.testing.assert_close(cut.full_logits(), dist.full_logits()[..., :11], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="restrict"):
        _head_dist().restricted(V + 1)


@pytest.mark.parametrize("kind, kw", [("jsd", dict(beta=0.5)), ("jsd", dict(beta=0.9)), ("rkl", dict(entry_clip=0.03)),
                                      ("fkl", dict(temperature=1.7)), ("rkl", dict(support="teacher_topk", k=4))])
def test_chunked_divergence_against_a_restricted_padded_teacher(kind, kw):
    """A student and a teacher head with padding rows past the n ids both cut to n (weights and
    bias sliced ``[:n]``): the chunked divergence (2 positions per chunk of 10) equals the naive
    form on the cut logits, values and gradients (float64)."""
    n = 13
    h = _randn(B, T, H, seed=5).requires_grad_()
    W = _randn(V + 3, H, seed=6).requires_grad_()  # 3 padding rows the cut drops
    b = _randn(V + 3, seed=7).requires_grad_()
    teacher = _head_dist().restricted(n)
    up = _randn(B, T, seed=8)
    got = chunked_divergence(h, W[:n], teacher, kind, bias_V=b[:n], chunk_size=2, teacher_floor=-100.0, **kw)
    want = divergence(torch.nn.functional.linear(h, W, b)[..., :n], floored_logp_V(teacher.full_logits()), kind, **kw)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for a, c in zip(torch.autograd.grad((got * up).sum(), (h, W, b)), torch.autograd.grad((want * up).sum(), (h, W, b))):
        torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-12)


def test_of_takes_every_form_and_refuses_two():
    h, W = _randn(3, H, seed=1), _randn(V, H, seed=2)
    assert TeacherDist.of((h, W)).hidden is h and TeacherDist.of((h, W, None)).bias_V is None
    assert TeacherDist.of(h @ W.T).logits is not None
    d = TeacherDist.of((h, W))
    assert TeacherDist.of(d) is d
    with pytest.raises(ValueError, match="not both"):
        TeacherDist(logits=h @ W.T, hidden=h, weight_VH=W)
    with pytest.raises(ValueError, match="disagree in H"):
        TeacherDist(hidden=h, weight_VH=W[:, :2])
    with pytest.raises(ValueError, match="vocabularies"):
        chunked_divergence(h, W[:5], d, "rkl")


def test_scores_give_their_full_distribution():
    dist = _head_dist()
    zeros = torch.zeros(B, T)
    ids = torch.zeros(B, T, 1, dtype=torch.long)
    model = Scores(zeros, zeros, ids, zeros[..., None], hidden_BTH=dist.hidden, head=(dist.weight_VH, dist.bias_V))
    torch.testing.assert_close(model.dist.full_logits(), dist.full_logits(), rtol=0, atol=0)
    torch.testing.assert_close(model.full_logits_BTV(), dist.full_logits().float())
    program = Scores(zeros, zeros, ids, zeros[..., None], logits_BTV=dist.full_logits())
    assert program.dist.logits is program.logits_BTV
    assert Scores(zeros, zeros, ids, zeros[..., None]).dist is None
