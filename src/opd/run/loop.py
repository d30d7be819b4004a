"""The one training loop: rollout -> teacher scoring -> signal -> loss -> step.

It never branches on the method: a :class:`opd.methods.base.Method` supplies the four
stage functions. Loss normalization is the token mean over the kept tokens of the whole
optimizer step (``mask_BT`` summed over every micro-batch), METHODS rule 4.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace

import torch

from opd.run.step_diagnostics import (
    repetition_metrics,
    student_step_stats,
    student_step_stats_from_hidden,
    student_step_stats_from_parts,
    teacher_step_metrics,
)
from opd.losses import masked_token_mean
from opd.methods.base import Experience, Method, Signal, StudentView
from opd.methods.degeneracy import first_step_record
from opd.models import fsdp, lora
from opd.models.device import model_device
from opd.run import distributed
from opd.models.hf import completion_hidden, completion_logits


def step_generator(seed: int, step: int) -> torch.Generator:
    """All randomness of step ``step`` comes from here, so a resumed run replays exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def pick_problems(pool: list, n: int, generator: torch.Generator) -> list:
    idx = torch.randperm(len(pool), generator=generator, device="cpu")[:n]
    return [pool[i] for i in idx.tolist()]


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (all of them, or a LoRA student's adapters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))


def make_scheduler(optimizer, *, warmup_steps: int, total_steps: int, schedule: str):
    """Linear warm-up, then constant, linear or cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_hyperparams(optimizer, scheduler, *, lr: float, weight_decay: float) -> None:
    """Make ``lr`` (the peak) and ``weight_decay`` the optimizer's, at the scheduler's
    current step. A resumed run needs it: the restored optimizer and scheduler states hold
    the old values, and the scheduler's factor is the new schedule's (never saved)."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = lr, weight_decay
        group["lr"] = lr * factor(scheduler.last_epoch)


def student_view(model, batch, *, lean: bool = True, stats_topk: int | None = None) -> StudentView:
    """The student's outputs on ``batch``'s completion columns. ``lean`` (default): the
    completion hidden states and the LM head, logits and log-probs made lazily (never the
    full ``[B, T, V]`` for a method that reads only ``logp_BT``; ``stats_topk``: see
    :class:`StudentView`); else the eager full-logits view (kept for comparison, e.g.
    ``bench/scaling.py``)."""
    ids_BT = batch.completion_ids_BT
    if lean:
        hidden_BTH = completion_hidden(model, batch)
        return StudentView.from_hidden(hidden_BTH, model.get_output_embeddings(), ids_BT, stats_topk=stats_topk)
    logits_BTV = completion_logits(model, batch)
    logp_BT = torch.log_softmax(logits_BTV, -1).gather(-1, ids_BT[..., None]).squeeze(-1)
    return StudentView(logits_BTV, logp_BT)


def is_metric(key: str) -> bool:
    """Signal keys with a ``/`` are metrics to log, not loss inputs."""
    return "/" in key


def loss_inputs(signal: Signal) -> Signal:
    return {k: v for k, v in signal.items() if not is_metric(k)}


def _rows(signal: Signal, rows: slice) -> Signal:
    """Every per-row tensor cut to ``rows``; anything else (a teacher's head) as it is."""
    return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in signal.items()}


def trimmed(batch, signal: Signal) -> tuple:
    """A micro-batch cut to its own width: prompt columns that are padding in every row
    (on the left) and completion columns past its longest completion (on the right) are
    dropped, from the batch and from every signal tensor whose second dimension is the
    completion width. Returns ``(batch, signal, cols)``, ``cols`` the kept completion
    columns. Causal attention and position ids from the attention mask make the kept
    positions' outputs the same as in the full-width batch (up to float rounding)."""
    T = batch.completion_mask_BT.shape[1]
    keep_T = max(1, int(batch.completion_mask_BT.any(0).nonzero().max()) + 1) if bool(batch.completion_mask_BT.any()) else 1
    prompt_used = batch.attention_mask_BL[:, : batch.prompt_len].any(0)
    first = int(prompt_used.float().argmax()) if bool(prompt_used.any()) else batch.prompt_len - 1
    first = min(first, batch.prompt_len - 1)  # the column predicting the first completion token stays
    cols = slice(0, keep_T)
    if keep_T == T and first == 0:
        return batch, signal, cols
    end = batch.prompt_len + keep_T
    cut = replace(batch, input_ids_BL=batch.input_ids_BL[:, first:end], attention_mask_BL=batch.attention_mask_BL[:, first:end],
                  prompt_len=batch.prompt_len - first, completion_mask_BT=batch.completion_mask_BT[:, :keep_T])
    narrow = lambda v: v[:, :keep_T] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == T else v  # noqa: E731
    return cut, {k: narrow(v) for k, v in signal.items()}, cols


def _cols(scores, rows: slice, cols: slice):
    """The teacher's top-K scores of a micro-batch's rows and kept completion columns."""
    return replace(scores, topk_ids_BTK=scores.topk_ids_BTK[rows, cols], topk_logp_BTK=scores.topk_logp_BTK[rows, cols])


@contextlib.contextmanager
def checkpointing(model):
    """Activate the model's own gradient checkpointing (when it was enabled) and a LoRA
    student's adapter dropout for the update.

    Hugging Face checkpoints a layer only while that layer is in training mode; the student
    stays in eval mode (no dropout: its log-probs are the sampler's), so only the layers
    that checkpoint are switched, not their children."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    layers += lora.dropout_modules(model)  # a LoRA student's adapter dropout: in the update only
    modes = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.training = mode


def signal_metrics(signal: Signal) -> dict:
    """Means of the signal's metric entries: scalars as they are, ``[B, T]`` over kept tokens."""
    mask_BT = signal["mask_BT"]
    out = {}
    for key, val in signal.items():
        if not is_metric(key):
            continue
        val = val.detach().float()
        if val.dim() == 2 and val.shape == mask_BT.shape:
            out[key] = float((val * mask_BT).sum() / mask_BT.sum().clamp(min=1))
        else:
            out[key] = float(val.mean()) if val.numel() else float("nan")
    return out


def _accumulate(totals: dict, metrics: dict, mask_BT: torch.Tensor) -> None:
    """Sum per-token metrics over kept tokens (scalars are weighted by the token count)."""
    n = float(mask_BT.sum())
    for key, val in metrics.items():
        val = val.detach()
        s = float((val * mask_BT).sum()) if val.dim() == mask_BT.dim() else float(val) * n
        totals[key] = (totals.get(key, (0.0, 0.0))[0] + s, totals.get(key, (0.0, 0.0))[1] + n)


def _student_diag(view: StudentView, completion_mask_BT: torch.Tensor, scores) -> dict:
    """Student-side ``diag/`` statistics of one micro-batch, with no extra decoder pass:
    from the lean view's chunked sweep (``side_stats``) when the loss read ``logp_BT``,
    else from the detached logits when the loss made them, else chunked from the hidden
    states (same values; never ``[B, T, V]``). The top-K overlap when ``scores``
    (aligned with the micro-batch) are given."""
    head = view.linear_head
    lean = not view.has_logits and view.hidden_BTH is not None and head is not None
    with torch.no_grad():
        ids_BTK = lp_BTK = None
        if scores is not None:
            dev = view.hidden_BTH.device if view.hidden_BTH is not None else view.logits_BTV.device
            ids_BTK, lp_BTK = scores.topk_ids_BTK.to(dev), scores.topk_logp_BTK.to(dev)
        if view.side_stats is not None and (ids_BTK is None or view.stats_topk == ids_BTK.shape[-1]):
            return student_step_stats_from_parts(*view.side_stats, completion_mask_BT, ids_BTK, lp_BTK)
        if lean:
            return student_step_stats_from_hidden(view.hidden_BTH, *head, completion_mask_BT, ids_BTK, lp_BTK, chunk_size=view.chunk_size)
        return student_step_stats(view.logits_BTV.detach(), completion_mask_BT, ids_BTK, lp_BTK)


def step_normalizer(mask_BT: torch.Tensor) -> torch.Tensor:
    """The loss divisor: the step's kept-token count (at least 1). Over ``N`` data-parallel
    ranks, whose gradients are averaged, each rank divides by the global count over ``N``:
    ``mean_r(Σ_r / (n / N)) = Σ / n``."""
    count = mask_BT.sum().clamp(min=1)
    if distributed.world() == 1:
        return count
    return count.new_tensor(max(distributed.total(mask_BT.sum()), 1.0) / distributed.world())


def micro_batches(rows: int, size: int) -> list[tuple[slice, bool]]:
    """``(rows, padding)`` of each micro-batch. Over several ranks every rank runs as many
    as the rank with the most (a sharded student's collectives pair up): the extra ones
    are ``padding``, the first row again with its loss times 0 (no gradient, no metrics)."""
    spans = [(slice(s, s + size), False) for s in range(0, rows, size)]
    most = int(distributed.most(len(spans)))
    if most > len(spans) and rows == 0:
        raise RuntimeError("this rank has no rows to train on while another rank has some")
    return spans + [(slice(0, 1), True)] * (most - len(spans))


def update(model, optimizer, exp: Experience, signal: Signal, method: Method, *, micro_batch_size: int, max_grad_norm: float, scores=None, lean: bool = True) -> dict:
    """One optimizer step over the experience, accumulating micro-batch gradients.

    A step whose loss or gradient norm is not finite is not applied: the gradients are
    dropped and ``optim/skipped_nonfinite`` is 1 (else 0).
    ``scores``: the teacher's scores of ``exp.batch`` (row- and column-aligned) or None;
    they only feed the ``diag/`` statistics, never the loss. ``lean``: the lazy student
    view (:func:`student_view`); False builds the full logits of every micro-batch."""
    signal = loss_inputs(signal)
    mask_BT = signal["mask_BT"]
    normalizer = step_normalizer(mask_BT)
    optimizer.zero_grad(set_to_none=True)
    totals: dict = {}
    diag: dict = {}
    loss_sum = 0.0
    stats_topk = 0 if scores is None else scores.topk_ids_BTK.shape[-1]
    for rows, padding in micro_batches(mask_BT.shape[0], micro_batch_size):
        batch, micro, cols = trimmed(exp.batch.select(rows), _rows(signal, rows))
        micro_scores = None if scores is None else _cols(scores, rows, cols)
        with checkpointing(model):
            view = student_view(model, batch, lean=lean, stats_topk=stats_topk)
            loss_BT, metrics = method.loss(view, micro)
            loss = masked_token_mean(loss_BT, micro["mask_BT"], normalizer) * (0.0 if padding else 1.0)
            if not padding:  # before backward: a sharded student's head is whole until then (opd.models.fsdp)
                _accumulate(diag, _student_diag(view, batch.completion_mask_BT, micro_scores), batch.completion_mask_BT)
            loss.backward()
        if not padding:
            loss_sum = loss_sum + loss.detach()
            _accumulate(totals, metrics, micro["mask_BT"])
        del view, loss_BT, metrics  # a cached [B, T, V] must not outlive its micro-batch
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = float(fsdp.full_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
    finite = math.isfinite(grad_norm) and not distributed.any_rank(not math.isfinite(float(loss_sum)))
    fsdp.reshard(model)  # a sharded student's optimizer updates the shards
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    out = {k: s / max(n, 1.0) for k, (s, n) in totals.items()}
    out.update({k: s / n for k, (s, n) in diag.items() if n > 0})  # nothing to measure: omitted
    out["optim/grad_norm"] = grad_norm
    out["optim/skipped_nonfinite"] = 0.0 if finite else 1.0
    return out


def rollout_metrics(exp: Experience, signal: Signal) -> dict:
    """Rollout statistics over the rows the rollout sampled (``exp.sampled_B``, default all)."""
    mask_BT = exp.batch.completion_mask_BT
    rows = exp.sampled_B if exp.sampled_B is not None else torch.ones(mask_BT.shape[0], dtype=torch.bool, device=mask_BT.device)
    out = {
        "rollout/length": float(mask_BT[rows].sum(1).float().mean()),
        "rollout/on_policy": float(exp.on_policy),
        "signal/kept_frac": float(signal["mask_BT"].sum() / mask_BT.sum().clamp(min=1)),
    }
    if exp.rewards_B is not None:
        out["rollout/reward"] = float(exp.rewards_B[rows].float().mean())
    if exp.truncated_B is not None:
        out["rollout/truncated"] = float(exp.truncated_B[rows].float().mean())
    out.update(repetition_metrics(exp.batch.completion_ids_BT[rows], mask_BT[rows]))
    return out


def aligned_scores(scores, batch):
    """``scores`` when they are column-aligned with ``batch`` (the method contract), else None."""
    if scores is None or tuple(scores.topk_ids_BTK.shape[:2]) != tuple(batch.completion_mask_BT.shape):
        return None
    return scores


def teacher_metrics(scores, mask_BT: torch.Tensor, completion_ids_BT: torch.Tensor | None = None) -> dict:
    """``teacher/entropy`` and ``teacher/token_logp`` (means over ``mask_BT``), plus the
    teacher-side ``diag/`` metrics when the completion ids are given."""
    n = mask_BT.sum().clamp(min=1)
    out = {
        "teacher/entropy": float((scores.entropy_BT * mask_BT).sum() / n),
        "teacher/token_logp": float((scores.token_logp_BT * mask_BT).sum() / n),
    }
    if completion_ids_BT is not None:
        ids_BT, m_BT = completion_ids_BT.to(scores.topk_ids_BTK.device), mask_BT.to(scores.topk_ids_BTK.device)
        out.update(teacher_step_metrics(scores.token_logp_BT, scores.topk_ids_BTK, scores.topk_logp_BTK, ids_BT, m_BT))
    return out


def memory_metrics(device: torch.device) -> dict:
    """``memory/peak_gib``: the accelerator's peak allocated memory since the last step (none on a CPU)."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"memory/peak_gib": peak}


def train_step(env, method: Method, problems: list, generator: torch.Generator, optimizer, *, micro_batch_size: int, max_grad_norm: float, ppo_epochs: int) -> tuple[dict, dict]:
    """Rollout, score, shape, update. Returns (metrics, usage counters of this step)."""
    device = model_device(env.student)
    t0 = time.perf_counter()
    with fsdp.gathered(env.student):  # a sharded student: whole, with no collective inside
        exp = method.rollout(env, problems, generator).to(device)
        t_score = time.perf_counter()
        scores, teacher_tokens = None, exp.teacher_tokens
        if method.teacher_request is not None:
            req = method.teacher_request
            teacher, context_batch = method.context(env, exp)
            full = req.full and getattr(teacher, "full_logits", True)  # a server: top-K (methods that need more refused at start)
            scores = teacher.score(context_batch, topk=req.topk, full=full, temperature=1.0).to(device)
            teacher_tokens += context_batch.num_tokens
        retries = {"teacher/retries": float(teacher.take_retries())} if scores is not None and hasattr(teacher, "take_retries") else {}
        t_signal = time.perf_counter()
        signal = method.signal(exp, scores)
    t1 = time.perf_counter()
    diag_scores = aligned_scores(scores, exp.batch)
    skipped = 0.0
    for _ in range(ppo_epochs):
        metrics = update(env.student, optimizer, exp, signal, method, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm, scores=diag_scores)
        skipped += metrics["optim/skipped_nonfinite"]
    metrics["optim/skipped_nonfinite"] = skipped  # updates not applied in this step (of ppo_epochs)
    metrics.update(rollout_metrics(exp, signal))
    metrics.update(signal_metrics(signal))
    if scores is not None:
        ids_BT = exp.batch.completion_ids_BT if diag_scores is not None else None
        metrics.update(teacher_metrics(scores, exp.batch.completion_mask_BT, ids_BT))
    if env.step == 0:  # degeneracy the first step shows: degenerate/<knob> (opd.methods.degeneracy)
        with fsdp.gathered(env.student):
            metrics.update(first_step_record(method, env, exp, scores, metrics))
    metrics.update({"time/rollout_s": t1 - t0, "time/score_s": t_signal - t_score, "time/update_s": time.perf_counter() - t1})
    metrics.update(memory_metrics(device))
    metrics.update(retries)  # a server teacher's failed requests retried this step
    usage = {"sequences": exp.batch.input_ids_BL.shape[0], "teacher_tokens": teacher_tokens}
    return metrics, usage
