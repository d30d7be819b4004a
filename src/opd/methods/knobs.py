"""Knobs that several methods share, declared once: type, range and help.

A method's knobs are the parameters of its builder (``build(**knobs) -> Method``), each
annotated with its type and a :func:`knob` (help text and range); the run config learns
them from the registry (:func:`opd.methods.knob_fields`), so a knob is declared in one
place. A knob that several methods take is declared here, so that they agree on its
type, default and range. A builder parameter without a :func:`knob` is a run setting the
method reads (``max_new_tokens``), declared by the run config.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.fields import FieldInfo


def knob(help: str, **bounds) -> FieldInfo:
    """A method knob's help text and bounds (``gt``, ``ge``, ``lt``, ``le``)."""
    return Field(description=help, **bounds)


Gamma = Annotated[float, knob("reward-to-go discount (0 per-token, 1 sequence-level)", ge=0, le=1)]
KlCoef = Annotated[float, knob("coefficient of the per-token reverse-KL reward")]
OpdLoss = Annotated[Literal["is", "ppo"], knob("importance sampling or PPO-clipped ratio")]
ClipEps = Annotated[float, knob("PPO clip range")]
AdvScale = Annotated[Literal["std", "none"], knob("divide group advantages by their std")]
Beta = Annotated[float, knob("JSD mixture weight (0 forward KL, 1 reverse KL)", ge=0, le=1)]
LossTemperature = Annotated[float, knob("temperature of the divergence")]
