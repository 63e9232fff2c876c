"""The spike guard: a step whose loss or gradient norm jumps far above the run's recent values is not applied, and
repeated spikes roll the run back to its newest complete checkpoint, past the data that held them.

Judging: the running statistics are the medians of the loss and grad norm of the last train.spike_window applied
steps. Once the window holds MIN_HISTORY of them, a step is a spike when its loss is over spike_loss_factor x their
median, or its grad norm over spike_grad_norm_factor x theirs. Every rank judges the same numbers (the grad norm is
global, the loss the data-parallel mean), so every rank skips the same step without a collective of its own.

Skipping: the trainer judges inside DeepSpeed's step, after ZeRO has computed the global grad norm and before any
update (a step pre-hook on the torch optimizer DeepSpeed drives), and a spike steps no parameter: the weights,
Adam's moments and its step count stay as they were. The step's data and its place in the learning-rate schedule are
spent. At PP > 1 the loss is known only after DeepSpeed's pipeline schedule has applied the step, so there the grad
norm alone decides; a loss spike found afterwards counts towards a rollback.

Rolling back: after spike_max_skips spikes within spike_window steps, or a non-finite loss or grad norm (a step
DeepSpeed itself did not apply), the trainer reloads the newest complete checkpoint and skips the samples from there
to the step it had reached (RUN/skipped_samples.json, and every later checkpoint's manifest: honoured at any
layout). After spike_max_rollbacks rollbacks the next one ends the run with exit 3.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

MIN_HISTORY = 10  # applied steps the medians need before the guard judges (a run's or a resume's first steps)


class SpikeGuard:
    def __init__(self, loss_factor: float, grad_norm_factor: float, window: int, max_skips: int,
                 max_rollbacks: int):
        """A factor of 0 judges nothing by that value."""
        self.loss_factor, self.grad_norm_factor, self.window = loss_factor, grad_norm_factor, window
        self.max_skips, self.max_rollbacks, self.rollbacks = max_skips, max_rollbacks, 0
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.spikes: deque[int] = deque()  # the steps of the spikes within the window

    def judge(self, loss: float | None, norm: float | None) -> str | None:
        """'grad_norm' or 'loss' if the step is a spike, else None; a value given as None is not judged. Non-finite
        values are not judged either: DeepSpeed does not apply such a step, and the trainer rolls back."""
        if len(self.norms) < MIN_HISTORY:
            return None
        if norm is not None and math.isfinite(norm) and self.grad_norm_factor and \
                norm > self.grad_norm_factor * statistics.median(self.norms):
            return "grad_norm"
        if loss is not None and math.isfinite(loss) and self.loss_factor and \
                loss > self.loss_factor * statistics.median(self.losses):
            return "loss"
        return None

    def record(self, step: int, loss: float, norm: float, spike: bool) -> None:
        """The step's outcome: a spike counts towards a rollback; an applied step joins the statistics."""
        if spike:
            self.spikes.append(step)
        elif math.isfinite(loss) and math.isfinite(norm):
            self.losses.append(loss)
            self.norms.append(norm)
        while self.spikes and self.spikes[0] <= step - self.window:
            self.spikes.popleft()

    def must_roll_back(self) -> bool:
        return self.max_skips > 0 and len(self.spikes) >= self.max_skips

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.spikes.clear()
