"""Fakes and naive references shared by the local-noise method tests (``test_methods_noise*.py``)."""

import torch

from opd.batch import make_batch
from opd.methods.base import Experience
from opd.models.base import Scores

D = torch.float64
TOL = dict(atol=1e-6, rtol=1e-6)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=gen(seed), dtype=D) * scale


def distinct_ids(B, T, K, V, seed=0):
    return torch.stack([torch.randperm(V, generator=gen(seed + i))[:K] for i in range(B * T)]).view(B, T, K)


def finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def fake_exp(B=4, T=5, V=7, seed=0, group_size=2, rewards=None):
    """A batch of B rows with ragged completions, sampler log-probs and verifier outcomes."""
    lengths = [T - (b % 3) for b in range(B)]
    ids = torch.randint(0, V, (B, T), generator=gen(seed))
    completions = [ids[b, : lengths[b]].tolist() for b in range(B)]
    batch = make_batch([[1, 2]] * B, completions, pad_id=0, width=T)
    mask = batch.completion_mask_BT
    sampler = torch.where(mask, -torch.rand(B, T, generator=gen(seed + 1), dtype=D) * 3, 0.0)
    rewards = torch.tensor(rewards if rewards is not None else [float(b % 3 == 0) for b in range(B)])
    group = torch.arange(B // group_size).repeat_interleave(group_size)
    return Experience(batch, [None] * B, group, sampler_logp_BT=sampler, rewards_B=rewards)


def fake_scores(exp, V=7, K=3, seed=5, scale=2.0):
    B, T = exp.batch.completion_mask_BT.shape
    logits = randn(B, T, V, seed=seed, scale=scale)
    logp = logits.log_softmax(-1)
    top_logp, top_ids = logp.topk(K, dim=-1)
    tok = logp.gather(-1, exp.batch.completion_ids_BT[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return Scores(tok, ent, top_ids, top_logp, logits)


def naive_fkl_topk(s_logits, t_logp_V, k):
    """Forward KL on the teacher's top-k, ties included, both sides renormalized there."""
    B, T, V = s_logits.shape
    out = torch.zeros(B, T, dtype=s_logits.dtype)
    for b in range(B):
        for t in range(T):
            kth = sorted(t_logp_V[b, t].tolist(), reverse=True)[k - 1]
            ids = [v for v in range(V) if float(t_logp_V[b, t, v]) >= kth - 1e-6]
            p = s_logits[b, t].softmax(-1)[ids]
            p = p / p.sum()
            q = t_logp_V[b, t, ids].exp()
            q = q / q.sum()
            out[b, t] = sum(q[j] * (torch.log(q[j]) - torch.log(p[j])) for j in range(len(ids)))
    return out
