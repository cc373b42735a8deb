"""Turns a stream of transformer calls into generations, steps and CFG branches.

A new timestep value starts a new step; a timestep that rises again starts a new
generation. The schedule position comes from the pipeline's cache context when it gives
the step index and the number of steps (diffusers pipelines do), else from the timestep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NUM_TRAIN_TIMESTEPS = 1000.0


@dataclass(frozen=True)
class StepInfo:
    generation: int
    step: int
    position: float
    timestep: float
    new_step: bool
    new_generation: bool
    call: int  # index of this transformer call within the step: the CFG branch when no context names it


class StepTracker:
    def __init__(self) -> None:
        self.generation = -1
        self.step = -1
        self._last_t: float | None = None
        self._call = 0

    def reset(self) -> None:
        self.__init__()

    def update(self, timestep: float, context: Any | None) -> StepInfo:
        new_gen = self._last_t is None or timestep > self._last_t
        new_step = new_gen or timestep != self._last_t
        if new_gen:
            self.generation += 1
            self.step = 0
        elif new_step:
            self.step += 1
        self._last_t = timestep
        self._call = 0 if new_step else self._call + 1
        n = getattr(context, "num_inference_steps", None)
        if n:
            position = self.step / max(1, int(n) - 1)
        else:
            position = 1.0 - timestep / NUM_TRAIN_TIMESTEPS
        position = min(1.0, max(0.0, position))
        return StepInfo(self.generation, self.step, position, timestep, new_step, new_gen, self._call)


def timestep_value(t: Any) -> float:
    """The scalar timestep of a call; per-token timesteps (Wan 2.2 TI2V) use their maximum."""
    if hasattr(t, "max"):
        return float(t.float().max()) if t.numel() else 0.0
    return float(t)
