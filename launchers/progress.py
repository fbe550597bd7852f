"""The local backend's progress: trials done out of all, and each running trial's step, total and ETA.

On a terminal one line is redrawn in place (about once a second); into a file or a pipe a plain
line is printed every ``local.progress_s`` seconds, when it changed. The backend's own messages
(started, done, restart) go through :meth:`Progress.say`, which clears the line first.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from launchers import state
from launchers.status import duration
from launchers.sweep import Trial

REDRAW_S = 1.0  # on a terminal


class Progress:
    def __init__(self, total: int, every_s: float, stream: TextIO = sys.stdout) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.every_s = REDRAW_S if self.tty else every_s
        self.last_time, self.last_line, self.drawn = 0.0, "", False

    def line(self, done: int, running: list[Trial]) -> str:
        """``progress: 2/6 finished; 1a2b3c4d5e 120/200 eta 1m05, …``, from each running trial's status."""
        parts = []
        for t in running:
            st = state.status(t.run_dir)
            step, total, eta = st.get("step"), st.get("n_iters"), st.get("eta_s")
            where = f"{step}/{total}" if step is not None and total else "starting"
            parts.append(f"{t.id} {where}" + (f" eta {duration(eta)}" if eta and step is not None else ""))
        return f"progress: {done}/{self.total} finished" + (f"; {', '.join(parts)}" if parts else "")

    def update(self, done: int, running: list[Trial], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_time < self.every_s:
            return
        self.last_time = now
        text = self.line(done, running)
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}")
            self.drawn = True
        elif text != self.last_line:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.last_line = text

    def say(self, message: str) -> None:
        """A line of the backend's own, above the progress line."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
