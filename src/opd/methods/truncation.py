"""Rollout truncation: plain OPD on a shortened rollout horizon (METHODS §14).

Three methods share one mechanism, a :class:`opd.rollouts.budget.LengthBudget` ``N(step)``:
the student generates at most ``N(step)`` new tokens and the loss is plain OPD
(:mod:`opd.methods.opd`) on exactly those tokens::

    y_{1..n} ~ pi_theta(.|x),  n <= N(step)           (a cut rollout has no EOS)
    r_t = -c · (log pi_sampler(y_t) - log pi_T(y_t)),  A_t = Σ_{t'>=t} gamma^{t'-t} r_{t'}
    L   = -(1/N_tok) Σ_{i,t<=n_i} exp(log pi_theta(y_t) - sg(log pi_sampler(y_t))) · sg(A_t)

- ``trunc`` (ESR, Zhou et al. 2605.27028): ``N = trunc_tokens``, clamped to
  ``max_new_tokens``. The paper's N = 100 (robust 50-200) is for LLM-length answers; on the
  testbed (answers of ~35-45 tokens, ``max_new_tokens`` 96) it never cuts a rollout and
  the method is exactly ``opd``, so the default is 16 (set ``trunc_tokens=100`` for LLM
  answers). Source: third-party (abstract and summaries).
- ``topd`` (Zhang et al. 2605.31490): ``N = round(horizon_frac · max_new_tokens)``
  (~10% of the full length). Source: third-party (abstract).
- ``popd`` (Zhang et al. 2605.31490): ``N`` grows from ``popd_start_frac · max_new_tokens``
  to ``max_new_tokens`` over the first ``round(popd_ramp_frac · steps)`` steps, linearly or
  geometrically (``popd_schedule``). Source: the method is third-party, the schedule a
  reconstruction (see :mod:`opd.rollouts.budget` for the exact formula).

A budget that never cuts a rollout makes any of the three exactly ``opd``: the run says so
(:func:`opd.methods.degeneracy.budget_never_binds`: the budget reaches ``max_new_tokens``,
or no rollout of the first step reached it).

Shared knobs: ``gamma``, ``kl_coef``, ``opd_loss``, ``clip_eps`` (as in ``opd``). With
``gamma > 0`` the return-to-go stops at the cut: the truncated suffix contributes nothing
(deliberate: it was never generated). Logged: ``rollout/budget`` (tokens allowed this step)
and, by the loop, ``rollout/truncated`` (rows cut by the budget or the cap).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

import torch

from opd.methods.base import Experience, Method, RolloutEnv, Signal, TeacherRequest, method_info
from opd.methods.degeneracy import Check, budget_never_binds, never
from opd.methods.knobs import ClipEps, Gamma, KlCoef, OpdLoss, knob
from opd.methods.opd import opd_signal, opd_token_loss
from opd.rollouts.budget import LengthBudget, fixed_budget, ramp_budget
from opd.rollouts.student import student_rollout
from opd.tasks.base import Problem


def budget_rollout(env: RolloutEnv, problems: list[Problem], generator: torch.Generator, budget: LengthBudget) -> Experience:
    """``student_rollout`` under ``budget(env.step)`` new tokens (never above the env's cap);
    ``exp.extra["budget_B"]`` holds the budget used (for ``rollout/budget``)."""
    tokens = min(budget(env.step), env.max_new_tokens)
    exp = student_rollout(env, problems, generator, max_new_tokens=tokens)
    exp.extra["budget_B"] = torch.full((exp.batch.input_ids_BL.shape[0],), tokens, dtype=torch.long, device=exp.batch.device)
    return exp


def budget_metric(exp: Experience) -> dict[str, torch.Tensor]:
    return {"rollout/budget": exp.extra["budget_B"].float()}


def budget_opd_method(
    name: str, budget: LengthBudget, *, gamma: float, kl_coef: float, opd_loss: str, clip_eps: float, degenerate: Check = never
) -> Method:
    """Plain OPD whose rollout is capped by ``budget``; the budget is the method's state."""

    def signal(exp: Experience, scores) -> Signal:
        return {**opd_signal(exp, scores, gamma=gamma, kl_coef=kl_coef), **budget_metric(exp)}

    return Method(
        name,
        lambda env, problems, generator: budget_rollout(env, problems, generator, budget),
        signal,
        lambda view, sig: opd_token_loss(view, sig, opd_loss=opd_loss, clip_eps=clip_eps),
        teacher_request=TeacherRequest(topk=8, full=False),
        needs=("teacher",),
        state=budget,
        degenerate=degenerate,
    )


@method_info(paper="Zhou et al., 2605.27028 (ESR)", fixes="horizon decay", source="third-party", recipe={})
def build_trunc(
    trunc_tokens: Annotated[int, knob("response tokens generated and distilled (ESR's N; the paper's 100 is for LLM-length answers)", ge=1)] = 16,
    max_new_tokens: int = 96,
    gamma: Gamma = 0.0,
    kl_coef: KlCoef = 1.0,
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
) -> Method:
    budget = fixed_budget(min(trunc_tokens, max_new_tokens), max_new_tokens)
    degenerate = partial(budget_never_binds, knob="trunc_tokens", budget=trunc_tokens)
    return budget_opd_method("trunc", budget, gamma=gamma, kl_coef=kl_coef, opd_loss=opd_loss, clip_eps=clip_eps, degenerate=degenerate)


@method_info(paper="Zhang et al., 2605.31490 (TOPD)", fixes="horizon decay", source="third-party", recipe={})
def build_topd(
    horizon_frac: Annotated[float, knob("rollout horizon as a fraction of max_new_tokens", gt=0, le=1)] = 0.1,
    max_new_tokens: int = 96,
    gamma: Gamma = 0.0,
    kl_coef: KlCoef = 1.0,
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
) -> Method:
    budget = fixed_budget(round(horizon_frac * max_new_tokens), max_new_tokens)
    degenerate = partial(budget_never_binds, knob="horizon_frac", budget=budget(0))
    return budget_opd_method("topd", budget, gamma=gamma, kl_coef=kl_coef, opd_loss=opd_loss, clip_eps=clip_eps, degenerate=degenerate)


@method_info(paper="Zhang et al., 2605.31490 (POPD)", fixes="horizon decay", source="reconstruction", recipe={})
def build_popd(
    popd_start_frac: Annotated[float, knob("horizon fraction at step 0", gt=0, le=1)] = 0.1,
    popd_schedule: Annotated[Literal["linear", "geometric"], knob("how the horizon grows")] = "linear",
    popd_ramp_frac: Annotated[float, knob("share of the run's steps after which the horizon is full", ge=0)] = 1.0,
    steps: int = 40,
    max_new_tokens: int = 96,
    gamma: Gamma = 0.0,
    kl_coef: KlCoef = 1.0,
    opd_loss: OpdLoss = "is",
    clip_eps: ClipEps = 0.2,
) -> Method:
    budget = ramp_budget(popd_start_frac, max_new_tokens, round(popd_ramp_frac * steps), popd_schedule)
    knob_name = "popd_ramp_frac" if budget(0) >= max_new_tokens and popd_start_frac < 1 else "popd_start_frac"
    degenerate = partial(budget_never_binds, knob=knob_name, budget=budget(0))
    return budget_opd_method("popd", budget, gamma=gamma, kl_coef=kl_coef, opd_loss=opd_loss, clip_eps=clip_eps, degenerate=degenerate)
