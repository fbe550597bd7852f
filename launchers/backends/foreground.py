"""Foreground backend (``--backend foreground``): the trials one after another, in this process.

The smallest complete backend, and the example of README's "Adding a backend": it calls the one
trial entry point (:func:`launchers.trial.run_trial`) for each trial in turn, with the trial's
output on this console. Ctrl-C checkpoints the running trial (it ends preempted; ``run`` again
resumes it) and starts no more. Nothing outlives ``run``, so there is nothing to observe or cancel
from another process beyond the trial's own files and lock.
"""

from __future__ import annotations

import os
import signal

from launchers import state
from launchers.backends import Backend
from launchers.state import Observation
from launchers.status import plural
from launchers.sweep import Sweep, Trial
from launchers.trial import run_trial
from lintrans.procenv import EXIT_FAILED, EXIT_PREEMPTED


class ForegroundBackend(Backend):
    name = "foreground"

    def describe(self, sweep: Sweep, trials: list[Trial]) -> str:
        return f"foreground: {plural(len(trials), 'trial')}, one at a time in this process"

    def submit(self, sweep: Sweep, trials: list[Trial]) -> int:
        print(self.describe(sweep, trials), flush=True)
        # Ctrl-C as SIGTERM: the trial's own preemption handling checkpoints it and returns 75.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
        try:
            return self._run(trials)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _run(self, trials: list[Trial]) -> int:
        failed = False
        for t in trials:
            state.write_launch(t.run_dir, self.name, str(os.getpid()), None)
            cwd = os.getcwd()
            try:
                code = run_trial(t.run_dir, backend=self.name)
            finally:
                os.chdir(cwd)  # run_trial works from the directory the trial was specified in
            if code == EXIT_PREEMPTED:
                print(f"foreground: interrupted; run the same command again to resume {t.id}", flush=True)
                return 130
            failed |= code != 0
        return EXIT_FAILED if failed else 0

    def observe(self, trials: list[Trial]) -> dict[str, Observation]:
        return {}  # nothing runs once `run` returned; the trials' files and locks say the rest

    def cancel(self, trials: list[Trial]) -> int:
        return 0  # a foreground trial ends with its `run` (Ctrl-C there)
