"""Online monitors: small stateful classes fed one step at a time, tested on synthetic series."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any


class SpikeDetector:
    """Flags a value above `threshold` × the running median of the previous `window` values.

    SigLIP §4.4 traces large-batch degradation to gradient-norm spikes; a ratio to a running median
    is scale-free (it means the same at every batch size and LR) and robust to the spikes themselves.
    Nothing is flagged until `window // 2` values have been seen, so the noisy first steps of
    training are not counted. Non-finite values are never spikes (divergence handles them) and never
    enter the history.
    """

    def __init__(self, threshold: float, window: int) -> None:
        self.threshold = threshold
        self.window = window
        self.history: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> tuple[bool, float | None]:
        """Feed one value; returns (is_spike, ratio to the running median or None while warming up)."""
        if not math.isfinite(value):
            return False, None
        ratio = None
        if len(self.history) >= max(1, self.window // 2):
            median = statistics.median(self.history)
            ratio = value / median if median > 0 else None
        self.history.append(value)
        return (ratio is not None and ratio > self.threshold), ratio

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.window)
