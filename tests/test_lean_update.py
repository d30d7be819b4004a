"""The lean student view (no full [B, T, V] logits unless a loss asks): the chunked token
log-prob against the naive ``log_softmax(logits).gather`` (float64 values and gradients),
the chunked student diag statistics against ``student_step_stats``, and one ``update``
through the lean and the eager full-logits views (same gradients, same metrics)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from opd.batch import make_batch
from opd.run.step_diagnostics import student_step_stats, student_step_stats_from_hidden
from opd.losses.selective import token_logp, token_logp_and_stats
from opd.methods import build_method
from opd.methods.base import Experience, StudentView
from opd.models.base import Scores
from opd.models.hf import completion_hidden, completion_logits
from opd.run.loop import _student_diag, student_view, update

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def naive_logp(h, W, b, ids):
    z = F.linear(h, W, b)
    return torch.log_softmax(z, -1).gather(-1, ids[..., None]).squeeze(-1)


def _inputs(B, T, H, V, seed, scale=1.0, bias=True):
    g = _gen(seed)
    h = (scale * torch.randn(B, T, H, generator=g, dtype=F64)).requires_grad_()
    W = torch.randn(V, H, generator=g, dtype=F64).requires_grad_()
    b = torch.randn(V, generator=g, dtype=F64).requires_grad_() if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    return h, W, b, ids


@pytest.mark.parametrize("chunk", [1, 4, 15, 64, None])
@pytest.mark.parametrize("bias", [True, False])
def test_token_logp_matches_naive_values_and_grads(chunk, bias):
    h, W, b, ids = _inputs(3, 5, 7, 11, seed=chunk or 0, bias=bias)
    g_BT = torch.randn(3, 5, generator=_gen(1), dtype=F64)
    params = [x for x in (h, W, b) if x is not None]
    ref = naive_logp(h, W, b, ids)
    got = token_logp(h, W, ids, bias_V=b, chunk_size=chunk)
    assert got.shape == (3, 5) and got.dtype == F64
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for a, c in zip(torch.autograd.grad((ref * g_BT).sum(), params), torch.autograd.grad((got * g_BT).sum(), params)):
        torch.testing.assert_close(c, a, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 4, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logsumexp_matches_naive_values_and_grads(chunk, temperature):
    """The log-normalizer over every id and over the ids outside a given set (the sparse
    divergence's tail), one sweep in chunks of ``chunk`` of 15 positions, vs ``logsumexp``."""
    from opd.losses.selective import chunked_logsumexp

    h, W, b, _ = _inputs(3, 5, 7, 11, seed=3)
    ex = torch.randint(0, 11, (3, 5, 4), generator=_gen(2))
    ex[0, 0] = torch.arange(4) + 7  # the 4 largest ids
    lse, out, nan = chunked_logsumexp(h, W, bias_V=b, temperature=temperature, exclude_ids_NK=ex, chunk_size=chunk)
    z = F.linear(h, W, b) / temperature
    want_lse, want_out = z.logsumexp(-1), z.scatter(-1, ex, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    assert not nan.any() and chunked_logsumexp(h, W, chunk_size=chunk)[1] is None
    g1, g2 = torch.randn(3, 5, generator=_gen(4), dtype=F64), torch.randn(3, 5, generator=_gen(5), dtype=F64)
    got = torch.autograd.grad((lse * g1 + out * g2).sum(), (h, W, b))
    want = torch.autograd.grad((want_lse * g1 + want_out * g2).sum(), (h, W, b))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_chunked_logsumexp_without_mass_outside_is_the_floor_with_zero_gradient():
    from opd.losses.selective import chunked_logsumexp

    h, W, b, _ = _inputs(1, 2, 3, 4, seed=1)
    _, out, _ = chunked_logsumexp(h, W, bias_V=b, exclude_ids_NK=torch.arange(4).expand(1, 2, 4), chunk_size=1)
    assert bool((out == torch.finfo(F64).min).all())
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(out.sum(), (h, W, b)))


def test_token_logp_peaked_logits_stay_finite_and_exact():
    h, W, b, ids = _inputs(2, 6, 4, 9, seed=3, scale=300.0)  # logits of order 1e3
    ref = naive_logp(h, W, b, ids)
    got = token_logp(h, W, ids, bias_V=b, chunk_size=5)
    assert torch.isfinite(got).all() and (ref < -100).any()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-9)
    (gh_ref,) = torch.autograd.grad(ref.sum(), h)
    (gh,) = torch.autograd.grad(got.sum(), h)
    assert torch.isfinite(gh).all()
    torch.testing.assert_close(gh, gh_ref, rtol=1e-10, atol=1e-8)


def test_token_logp_gradcheck_and_float32():
    h, W, b, ids = _inputs(2, 3, 4, 6, seed=4)
    assert torch.autograd.gradcheck(lambda h, W, b: token_logp(h, W, ids, bias_V=b, chunk_size=2), (h, W, b))
    h32, W32 = h.detach().float(), W.detach().float()
    got = token_logp(h32, W32, ids, chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_logp(h32, W32, None, ids), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        token_logp(h32, W32, ids[:, :2])


@pytest.mark.parametrize("topk,chunk,scale", [(3, 4, 1.0), (0, 5, 1.0), (20, 2, 1.0), (4, None, 300.0)])
def test_token_logp_and_stats_side_outputs_match_naive(topk, chunk, scale):
    h, W, b, ids = _inputs(2, 5, 6, 13, seed=12, scale=scale)
    logp, ent, top = token_logp_and_stats(h, W, ids, topk=topk, bias_V=b, chunk_size=chunk)
    z = F.linear(h, W, b).detach()
    ref_logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(logp, naive_logp(h, W, b, ids), rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, -(ref_logp.exp() * ref_logp).sum(-1), rtol=0, atol=1e-12)
    assert not ent.requires_grad and logp.requires_grad
    assert top.shape == (2, 5, min(topk, 13)) and torch.equal(top, z.topk(min(topk, 13), -1).indices)
    (g,) = torch.autograd.grad(logp.sum(), W)
    (g_ref,) = torch.autograd.grad(naive_logp(h, W, b, ids).sum(), W)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-9)


def test_lean_view_is_lazy_cached_and_matches_eager():
    h, W, _, ids = _inputs(2, 5, 6, 13, seed=5, bias=False)
    head = torch.nn.Linear(6, 13, bias=False, dtype=F64)
    with torch.no_grad():
        head.weight.copy_(W)
    view = StudentView.from_hidden(h, head, ids, chunk_size=3)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    logp = view.logp_BT
    assert not view.has_logits and not calls  # the log-probs never call the head on [B, T]
    torch.testing.assert_close(logp, naive_logp(h, W, None, ids), rtol=0, atol=1e-12)
    assert view.logp_BT is logp
    logits = view.logits_BTV
    assert view.has_logits and view.logits_BTV is logits and len(calls) == 1
    assert torch.equal(logits, head(h).float()) and logits.requires_grad
    # logits first: the log-probs come from them (the eager formula)
    other = StudentView.from_hidden(h, head, ids)
    z = other.logits_BTV
    assert torch.equal(other.logp_BT, torch.log_softmax(z, -1).gather(-1, ids[..., None]).squeeze(-1))
    # the eager form as before, either field may be None
    eager = StudentView(z, None)
    assert eager.logits_BTV is z and eager.logp_BT is None and StudentView(None, logp).logits_BTV is None


@pytest.mark.parametrize("chunk,scale", [(1, 3.0), (7, 3.0), (None, 3.0), (4, 300.0)])
def test_student_stats_from_hidden_match_full_logits(chunk, scale):
    B, T, H, V, K = 3, 5, 6, 17, 4
    h, W, b, _ = _inputs(B, T, H, V, seed=6)
    h, W, b = h.detach() * scale, W.detach(), b.detach()
    mask = torch.rand(B, T, generator=_gen(7)) < 0.7
    t_lp, t_ids = torch.log_softmax(torch.randn(B, T, V, generator=_gen(8), dtype=F64), -1).topk(K, -1)
    t_lp[0, 0, -1] = float("-inf")
    ref = student_step_stats(F.linear(h, W, b), mask, t_ids, t_lp)
    got = student_step_stats_from_hidden(h, W, b, mask, t_ids, t_lp, chunk_size=chunk)
    assert set(got) == set(ref) == {"diag/student_entropy", "diag/topk_overlap"}
    for key in ref:
        torch.testing.assert_close(got[key].double(), ref[key].double(), rtol=0, atol=1e-12)
    only = student_step_stats_from_hidden(h, W, b, mask, chunk_size=chunk)
    assert set(only) == {"diag/student_entropy"}


# --- one update through the real loop, lean vs eager ------------------------------------

V, PAD = 40, 0


def _model():
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=PAD)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _experience(B=5, T=7, seed=9):
    g = _gen(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    completions = [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]
    batch = make_batch([[1, 2, 3]] * B, completions, PAD)
    sampler = -torch.rand(batch.completion_mask_BT.shape, generator=g) * 3
    return Experience(batch=batch, problems=[None] * B, group_B=torch.arange(B), sampler_logp_BT=sampler,
                      extra={"mix_logp_BT": sampler - 0.1})


def _scores(model, batch):
    with torch.no_grad():
        logits = completion_logits(model, batch) * 0.5 + 0.3 * torch.randn(*batch.completion_mask_BT.shape, V, generator=_gen(11))
    logp = torch.log_softmax(logits, -1)
    top_lp, top_ids = logp.topk(4, -1)
    tok = logp.gather(-1, batch.completion_ids_BT[..., None]).squeeze(-1)
    return Scores(tok, -(logp.exp() * logp).sum(-1), top_ids, top_lp, logits)


def _one_update(method_name, lean):
    model, exp = _model(), _experience()
    method = build_method(method_name, {"opd_loss": "ppo"})
    scores = _scores(model, exp.batch)
    signal = method.signal(exp, scores)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = update(model, opt, exp, signal, method, micro_batch_size=2, max_grad_norm=0.0, scores=scores, lean=lean)
    return metrics, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("method_name", ["opd", "gkd", "minillm"])
def test_update_lean_equals_eager(method_name):
    m_lean, g_lean = _one_update(method_name, lean=True)
    m_eager, g_eager = _one_update(method_name, lean=False)
    assert set(m_lean) == set(m_eager) and {"diag/student_entropy", "diag/topk_overlap"} <= set(m_lean)
    for key, val in m_eager.items():
        assert m_lean[key] == pytest.approx(val, rel=1e-5, abs=1e-6), key
    for key, g in g_eager.items():
        torch.testing.assert_close(g_lean[key], g, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("stats_topk", [None, 4])
def test_lean_opd_never_builds_full_logits(stats_topk):
    model, exp = _model(), _experience()
    method = build_method("opd", {})
    signal = method.signal(exp, _scores(model, exp.batch))
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    view = student_view(model, exp.batch, stats_topk=stats_topk)
    loss_BT, _ = method.loss(view, {k: v for k, v in signal.items() if "/" not in k})
    loss_BT.sum().backward()
    assert (view.side_stats is None) == (stats_topk is None)
    scores = _scores(model, exp.batch)
    calls.clear()
    stats = _student_diag(view, exp.batch.completion_mask_BT, scores)
    assert not view.has_logits and not calls and set(stats) == {"diag/student_entropy", "diag/topk_overlap"}
    ref = student_step_stats(completion_logits(model, exp.batch), exp.batch.completion_mask_BT, scores.topk_ids_BTK, scores.topk_logp_BTK)
    for key, val in ref.items():
        torch.testing.assert_close(stats[key], val, rtol=0, atol=1e-5)
    torch.testing.assert_close(view.hidden_BTH, completion_hidden(model, exp.batch))


def test_view_falls_back_to_full_logits_for_a_non_plain_head():
    class Scaled(torch.nn.Linear):  # e.g. a quantized or logit-scaled head: its weight is not the whole story
        def forward(self, x):
            return 2.0 * super().forward(x)

    h, _, _, ids = _inputs(2, 4, 5, 9, seed=13, bias=False)
    head = Scaled(5, 9, bias=False, dtype=F64)
    view = StudentView.from_hidden(h, head, ids, stats_topk=3)
    ref = torch.log_softmax(head(h).float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert view.linear_head is None and torch.equal(view.logp_BT, ref) and view.has_logits and view.side_stats is None
