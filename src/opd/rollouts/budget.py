"""The rollout length budget: how many new tokens the student may generate at a step.

One small callable, ``LengthBudget(step) -> tokens``, serves every horizon method:

- ``fixed``: a constant ``start_tokens`` (ESR's N, TOPD's ``horizon_frac · max``).
- ``linear`` / ``geometric``: POPD's growing horizon. With ramp length ``R`` steps and
  ``f = min(1, step / (R − 1))`` (``f = 1`` when ``R <= 1``)::

      linear:    N(step) = N_0 + f · (N_max − N_0)
      geometric: N(step) = N_0 · (N_max / N_0)^f

  rounded to the nearest integer, so step 0 generates ``N_0`` and step ``R − 1`` (and every
  later step) the full ``N_max``. Source: reconstruction (METHODS §14: "a horizon that
  grows during training, e.g. linear or geometric"); not the paper's own schedule.
- ``adaptive``: Prune-OPD's budget; ``current`` is set after every step by the method
  (:meth:`LengthBudget.set_next`) and read at the next one.

Every value is clamped to ``[1, max_tokens]``. The budget is a method's ``state``: its
``state_dict`` holds the schedule and the adaptive value, so a resumed run continues the
schedule it started with (even if ``steps`` changed in between). The rollout that uses it
is :func:`opd.methods.truncation.budget_rollout`. Pure Python: no torch, no models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Schedule = Literal["fixed", "linear", "geometric", "adaptive"]


@dataclass
class LengthBudget:
    max_tokens: int  # the run's cap (``max_new_tokens``)
    start_tokens: int  # budget at step 0 (fixed: always)
    schedule: Schedule = "fixed"
    ramp_steps: int = 1  # linear/geometric: steps from start_tokens to max_tokens
    current: int = 0  # adaptive: budget of the next step

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.schedule not in ("fixed", "linear", "geometric", "adaptive"):
            raise ValueError(f"unknown budget schedule {self.schedule!r}")
        self.start_tokens = self._clamp(self.start_tokens)
        if self.schedule == "adaptive" and self.current < 1:
            self.current = self.start_tokens

    def _clamp(self, tokens: float) -> int:
        return int(min(self.max_tokens, max(1, round(tokens))))

    def __call__(self, step: int) -> int:
        if self.schedule == "fixed":
            return self.start_tokens
        if self.schedule == "adaptive":
            return self._clamp(self.current)
        f = 1.0 if self.ramp_steps <= 1 else min(1.0, max(0.0, step / (self.ramp_steps - 1)))
        n0, n1 = self.start_tokens, self.max_tokens
        if self.schedule == "linear":
            return self._clamp(n0 + f * (n1 - n0))
        return self._clamp(n0 * (n1 / n0) ** f)

    def set_next(self, tokens: int) -> None:
        """Adaptive mode: the budget of the next step (clamped to ``[1, max_tokens]``)."""
        if self.schedule != "adaptive":
            raise ValueError(f"set_next needs an adaptive budget, this one is {self.schedule!r}")
        self.current = self._clamp(tokens)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"not a LengthBudget state (unknown keys {sorted(unknown)})")
        for key, value in state.items():
            setattr(self, key, value)


def fixed_budget(tokens: int, max_tokens: int) -> LengthBudget:
    return LengthBudget(max_tokens=max_tokens, start_tokens=tokens)


def ramp_budget(start_frac: float, max_tokens: int, ramp_steps: int, schedule: str) -> LengthBudget:
    return LengthBudget(max_tokens, round(start_frac * max_tokens), schedule, max(1, ramp_steps))


def adaptive_budget(max_tokens: int) -> LengthBudget:
    """Starts at the full cap; the method shrinks or grows it after every step."""
    return LengthBudget(max_tokens, max_tokens, "adaptive", current=max_tokens)

