"""Live progress on the terminal, read from the store, so every executor shows the same thing."""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from typing import TextIO

from scalestudy.store import RunStore, Status


class Progress:
    """Prints study progress: counts by state and the step of each running trial.

    On a terminal one line is redrawn in place; otherwise (CI, logs) a line is printed when
    something changes, at most every `quiet_s` seconds.
    """

    def __init__(self, store: RunStore, trial_ids: list[str], out: TextIO | None = None,
                 quiet_s: float = 10.0) -> None:
        self.store, self.trial_ids = store, trial_ids
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.quiet_s = quiet_s
        self._last_line, self._last_print = "", 0.0

    def line(self) -> str:
        states = {tid: self.store.trial(tid).state() for tid in self.trial_ids}
        counts = Counter(s.status for s in states.values())
        done = sum(n for status, n in counts.items() if status.is_result)
        parts = [f"[{done}/{len(states)} finished]"]
        parts += [f"{n} {status}" for status, n in sorted(counts.items())
                  if status != Status.DONE and n]
        for tid, state in states.items():
            if state.status == Status.RUNNING and state.step:
                shown = f" loss {state.loss:.3f}" if state.loss is not None else ""
                parts.append(f"{tid} {state.step}/{state.steps or '?'}{shown}")
        return "  ".join(parts)

    def tick(self, force: bool = False) -> None:
        line = self.line()
        now = time.time()
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\r" + line[:width].ljust(width))
            self.out.flush()
        elif force or (line != self._last_line and now - self._last_print >= self.quiet_s):
            print(line, file=self.out, flush=True)
            self._last_print = now
        self._last_line = line

    def close(self) -> None:
        self.tick(force=not self.tty)
        if self.tty:
            self.out.write("\n")
