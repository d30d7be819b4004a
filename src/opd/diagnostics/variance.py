"""Gradient variance of the OPD estimators as the horizon grows.

For one prompt and ``R`` rollouts ``y^(r)`` of the student, each rollout's gradient
estimate of the OPD objective w.r.t. a parameter subset ``θ_s`` is the REINFORCE form of
the surrogate (the on-policy gradient of :func:`opd.losses.importance_sampling_loss`,
summed over the rollout's tokens)::

    r_t   = -(log pi_S(y_t | c_t) - max(log pi_T(y_t | c_t), -100))
    A_t   = Σ_{t' >= t} gamma^{t'-t} r_{t'}              (gamma=0 per-token, 1 reward-to-go)
    g^(r) = Σ_t A_t ∇_{θ_s} log pi_S(y_t | c_t)

and the estimator's total variance is the trace of its covariance across the rollouts,
``tr Cov = Σ_p Var_r(g^(r)_p) = (Σ_r ||g^(r)||² - R ||ḡ||²) / (R - 1)``, averaged over
prompts. Plotted against the mean rollout length ``L`` on log-log axes, the slope of the
least-squares line is the growth exponent (``tr Cov ∝ L^slope``).

The parameter subset is the LM head (output embedding; the decoder's hidden states are
computed without a graph, so the cost is one head backward per rollout). Where the head
is tied to the input embedding (the testbed models) only its role as the head is
differentiated. The diagnostic
is sampled at the student's own sampling settings; the rollout log-probs are recomputed
by a full forward pass, so the importance ratio is 1 (on-policy).
"""

from __future__ import annotations

import math

import torch

from opd.batch import SeqBatch
from opd.losses import discounted_returns
from opd.losses.selective import token_logp
from opd.models.head import head_params as lm_head_weights
from opd.models.hf import completion_hidden
from opd.signals.opd import floored_log_ratio_BT


def head_params(model) -> list[torch.nn.Parameter]:
    """The LM head's parameters (weight, and bias if any)."""
    return [p for p in model.get_output_embeddings().parameters()]


class TraceCov:
    """Streaming trace of the covariance of vectors ``g^(r)`` (memory: one vector)."""

    def __init__(self):
        self.n, self.sum, self.sq = 0, None, 0.0

    def add(self, g_P: torch.Tensor) -> None:
        g_P = g_P.double()
        self.n += 1
        self.sum = g_P.clone() if self.sum is None else self.sum + g_P
        self.sq += float((g_P * g_P).sum())

    def value(self) -> float:
        """``(Σ ||g||² - n ||mean||²) / (n - 1)``; NaN with fewer than two vectors."""
        if self.n < 2:
            return float("nan")
        mean = self.sum / self.n
        return max(0.0, (self.sq - self.n * float((mean * mean).sum())) / (self.n - 1))


def rollout_advantages(sampler_logp_BT, teacher_logp_BT, mask_BT, gamma: float) -> torch.Tensor:
    """``A_t`` of the module doc (kl_coef 1), 0 on padding."""
    return discounted_returns(-floored_log_ratio_BT(sampler_logp_BT, teacher_logp_BT, mask_BT), mask_BT, gamma)


def _token_logp(head, hidden_BTH: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
    """``log pi(y_t)`` differentiable w.r.t. the head: chunked for a plain linear head (no
    ``[B, T, V]``), from the full logits for any other head."""
    if type(head) is torch.nn.Linear:
        weight, bias = lm_head_weights(head)
        return token_logp(hidden_BTH, weight, ids_BT, bias_V=bias)
    logits_BTV = head(hidden_BTH).float()
    return torch.log_softmax(logits_BTV, -1).gather(-1, ids_BT[..., None]).squeeze(-1)


def iter_rollout_gradients(student, batch: SeqBatch, teacher_logp_BT: torch.Tensor, gammas: tuple[float, ...]):
    """Yield ``(row, gamma, g^(r))``: each rollout's gradient (module doc) w.r.t. the LM
    head, flattened, one at a time (a real model's head gradient is large)."""
    params = head_params(student)
    with torch.no_grad():
        hidden_BTH = completion_hidden(student, batch)
    logp_BT = _token_logp(student.get_output_embeddings(), hidden_BTH, batch.completion_ids_BT.to(hidden_BTH.device))
    mask_BT = batch.completion_mask_BT
    adv = {g: rollout_advantages(logp_BT.detach(), teacher_logp_BT.to(logp_BT), mask_BT, g) for g in gammas}
    for b in range(logp_BT.shape[0]):
        for g in gammas:
            obj = (adv[g][b] * logp_BT[b] * mask_BT[b]).sum()
            grads = torch.autograd.grad(obj, params, retain_graph=True, allow_unused=True)
            yield b, g, torch.cat([x.reshape(-1) for x in grads if x is not None])


def rollout_gradients(student, batch: SeqBatch, teacher_logp_BT: torch.Tensor, gammas: tuple[float, ...]):
    """``{gamma: [g^(r) for each row]}`` from :func:`iter_rollout_gradients`."""
    out: dict[float, list[torch.Tensor]] = {g: [] for g in gammas}
    for _, g, g_P in iter_rollout_gradients(student, batch, teacher_logp_BT, gammas):
        out[g].append(g_P)
    return out


def total_variance(grads_by_prompt: list[list[torch.Tensor]]) -> float:
    """Mean over prompts of the trace of the covariance across that prompt's rollouts."""
    accs = []
    for grads in grads_by_prompt:
        acc = TraceCov()
        for g_P in grads:
            acc.add(g_P)
        accs.append(acc)
    return mean_trace(accs)


def mean_trace(accs: list[TraceCov]) -> float:
    """Mean of :meth:`TraceCov.value` over the accumulators with two vectors or more."""
    values = [a.value() for a in accs if a.n >= 2]
    return sum(values) / len(values) if values else float("nan")


def loglog_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of ``log y`` on ``log x`` over the points with ``x, y > 0``
    (finite); NaN with fewer than two such points or no spread in ``x``."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(a for a, _ in pts) / len(pts)
    my = sum(b for _, b in pts) / len(pts)
    sxx = sum((a - mx) ** 2 for a, _ in pts)
    if sxx == 0:
        return float("nan")
    return sum((a - mx) * (b - my) for a, b in pts) / sxx


def horizon_point(student, teacher, sample_fn, prompts: list[list[int]], repeats: int, gammas=(0.0, 1.0)) -> dict:
    """One horizon: ``repeats`` rollouts per prompt from ``sample_fn(prompt_list) ->
    (SeqBatch, sampler_logp_BT)``, scored by ``teacher``; returns ``length`` (mean
    rollout length) and ``var@gamma`` (:func:`total_variance`) for each gamma."""
    accs: dict[float, list[TraceCov]] = {g: [] for g in gammas}
    lengths = []
    for prompt in prompts:
        batch, _ = sample_fn([prompt] * repeats)
        teacher_logp_BT = teacher.score(batch, topk=1).token_logp_BT.cpu()
        lengths += batch.completion_mask_BT.sum(-1).tolist()
        mine = {g: TraceCov() for g in gammas}
        for _, g, g_P in iter_rollout_gradients(student, batch, teacher_logp_BT, gammas):
            mine[g].add(g_P)
        for g in gammas:
            accs[g].append(mine[g])
    out = {"length": sum(lengths) / max(len(lengths), 1)}
    out.update({f"var@{g:g}": mean_trace(accs[g]) for g in gammas})
    return out
