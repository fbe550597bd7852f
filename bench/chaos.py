"""A chaos soak: a sweep survives faults mixed at random and ends as a calm run of it does.

    .venv/bin/python bench/chaos.py                               # local backend: 12 trials, 4 min of faults
    .venv/bin/python bench/chaos.py --backend slurm               # the 2-node SLURM test cluster
    .venv/bin/python bench/chaos.py --trials 4 --chaos-s 40 --out DIR    # the test suite's short variant

1. **calm**: the sweep on the local backend, undisturbed: every trial's final weights.
2. **chaos**: the same sweep (the same trial ids, in another runs folder) on ``--backend``, while a
   driver seeded by ``--seed`` injects a fault every 2-8 s for ``--chaos-s`` seconds, each class once
   in a shuffled first round, then at random:

   ``kill9``     SIGKILL of a running trial's process (the pid its ``status.json`` records)
   ``kill_launcher``  the launcher killed mid-submission: ``run`` started and SIGKILLed 0-2 s later (local:
                 the running launcher first; its trials get SIGTERM and checkpoint), then ``run`` again
   ``cancel``    ``lintrans cancel`` of the sweep, then ``run`` again
   ``readers``   ``status``, ``table`` and ``status --format json`` at once: each exits 0, no traceback
   ``requeue``   (slurm) ``scontrol requeue`` of a running trial's job
   ``slurmd``    (slurm) a node's slurmd and its jobs killed (``cluster.sh node-kill``), restarted 5-15 s later
3. **heal**: as a user after the storm, ``run`` until nothing is left to submit.
4. **checks**: every trial ``done``; exactly one record per evaluation, of the final step; model and EMA
   weights bitwise equal to the calm run's; no temp file (``.*.tmp``) left anywhere.

Writes ``<out>/<name>.json`` and ``.md`` (faults per class, trials, wall times, seed, checks; name
``chaos`` or ``chaos_slurm``); exits 1 if a check fails. Progress goes to stdout as it happens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _common as C

LAUNCHER = [sys.executable, "-m", "launchers"]
NAME = "chaos"
FORWARDS, HORIZONS = ["heat", "constant_velocity"], [3, 5]  # x seeds: trials come in fours
LOCAL_FAULTS = ["kill9", "kill_launcher", "cancel", "readers"]
SLURM_FAULTS = [*LOCAL_FAULTS, "requeue", "slurmd"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["local", "slurm"], default="local")
    p.add_argument("--trials", type=int, default=12, help="a multiple of 4 (2 processes x 2 horizons x seeds)")
    p.add_argument("--steps", type=int, default=60, help="training steps per trial (a checkpoint every 5)")
    p.add_argument("--chaos-s", type=float, default=240.0, help="seconds of fault injection")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heal-rounds", type=int, default=8)
    p.add_argument("--out", type=Path, default=C.RESULTS, help="folder of the results files")
    a = p.parse_args()
    if a.trials < 4 or a.trials % 4:
        p.error(f"--trials {a.trials}: a positive multiple of 4")
    return a


def write_sweep(folder: Path, trials: int, steps: int) -> Path:
    """A sweep of tiny models: long enough to be hit mid-training, short enough for a 2-core machine."""
    config = C.ROOT / "configs" / "mnist5k" / "default_mnist5k_configs.py"
    overrides = {
        "training.n_iters": steps, "training.batch_size": 8, "training.log_freq": 5, "training.eval_freq": 1000,
        "training.sampling_freq": 0, "training.snapshot_freq": 1000, "training.snapshot_freq_for_preemption": 5,
        "eval.batch_size": 50, "eval.num_batches": 1, "model.model_channels": 8, "model.channel_mult": [1, 1, 1],
        "model.num_res_blocks": 1, "model.attention_levels": [], "model.dropout": 0.0,
    }  # fmt: skip
    sweep = {
        "name": NAME,
        "config": str(config),
        "axes": {"model.forward": FORWARDS, "model.K": HORIZONS},
        "seeds": list(range(trials // 4)),
        "overrides": overrides,
        "evaluations": [{"mode": "elbo"}],
        "resources": {"cpus": 1, "gpus": 0, "time_min": 30},
        "local": {"slots": 2, "max_restarts": 1000},  # every kill is a crash to restart, not a failure
        "slurm": {"array_parallelism": 2, "max_requeues": 1000, "signal_delay_s": 30},
    }
    path = folder / f"{NAME}.yaml"
    path.write_text(json.dumps(sweep, indent=1))  # JSON is YAML
    return path


class Sweep:
    """One runs folder of the sweep, driven through the ``lintrans`` command as a user drives it."""

    def __init__(self, runs: Path, sweep: Path, backend: str, env: dict[str, str], log: Path) -> None:
        self.runs, self.sweep, self.backend, self.env, self.log = runs, sweep, backend, env, log
        self.dir = runs / "sweeps" / NAME

    def cmd(self, *args: str) -> list[str]:
        return [*LAUNCHER, "--runs-dir", str(self.runs), *args]

    def start(self, *args: str) -> subprocess.Popen:
        with self.log.open("a") as out:
            return subprocess.Popen(self.cmd(*args), cwd=C.ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def call(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args), cwd=C.ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    def run(self) -> subprocess.Popen:
        return self.start("run", str(self.sweep), "--backend", self.backend)

    def states(self) -> dict[str, dict]:
        """``status --format json``: each trial's view, as the user sees it."""
        shown = self.call("status", str(self.sweep), "--format", "json")
        if shown.returncode != 0:
            raise RuntimeError(f"status failed: {shown.stderr[-2000:]}")
        return {row["trial"]: row for row in json.loads(shown.stdout)}

    def trials(self) -> list[Path]:
        return sorted(p.parent for p in self.dir.glob("*/trial.json"))

    def running(self) -> list[tuple[Path, dict]]:
        """Trials whose own ``status.json`` says running, in a trial process alive on this machine.

        The test cluster's nodes are this machine under other host names (their own UTS namespace,
        the same process ids), so on SLURM any host will do.
        """
        out = []
        for trial in self.trials():
            try:
                st = json.loads((trial / "status.json").read_text())
                cmdline = Path(f"/proc/{st.get('pid')}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            here = self.backend == "slurm" or st.get("host") == socket.gethostname()
            if st.get("state") == "running" and here and b"launchers" in cmdline:
                out.append((trial, st))
        return out


class Chaos:
    """The fault driver: one method per fault class, each a thing that happens on real clusters."""

    def __init__(self, sweep: Sweep, rng: random.Random, slurm_env: dict | None) -> None:
        self.sweep, self.rng, self.slurm_env = sweep, rng, slurm_env
        self.launcher: subprocess.Popen | None = None
        self.faults: Counter[str] = Counter()
        self.missed: Counter[str] = Counter()  # a class drawn when it had no target (no trial running)
        self.problems: list[str] = []

    def say(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} chaos: {text}", flush=True)

    def launch(self) -> None:
        """Local: a launcher must be there to run the trials (a second one waits for the first's lock)."""
        if self.sweep.backend == "local":
            if self.launcher is None or self.launcher.poll() is not None:
                self.launcher = self.sweep.run()
        else:
            done = self.sweep.call("run", str(self.sweep.sweep), "--backend", "slurm")
            if done.returncode not in (0, 1):
                self.problems.append(f"run exited {done.returncode}: {done.stderr[-500:]}")

    def kill9(self) -> bool:
        running = self.sweep.running()
        if not running:
            return False
        trial, st = self.rng.choice(running)
        try:
            os.kill(st["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.say(f"kill -9 trial {trial.name} (pid {st['pid']}, step {st.get('step')})")
        return True

    def kill_launcher(self) -> bool:
        if self.sweep.backend == "local" and self.launcher is not None and self.launcher.poll() is None:
            self.launcher.kill()
            self.launcher.wait()
        delay = self.rng.uniform(0.0, 2.0)
        proc = self.sweep.run()
        time.sleep(delay)
        proc.kill()
        proc.wait()
        self.say(f"launcher killed {delay:.1f} s into a submission")
        self.launcher = None
        self.launch()
        return True

    def cancel(self) -> bool:
        done = self.sweep.call("cancel", str(self.sweep.sweep))
        if done.returncode != 0:
            self.problems.append(f"cancel exited {done.returncode}: {done.stderr[-500:]}")
        self.say(f"cancel: {done.stdout.strip().splitlines()[-1:] or done.stderr.strip()[-200:]}")
        if self.launcher is not None:
            try:
                self.launcher.wait(timeout=120)  # its trials stop; it returns
            except subprocess.TimeoutExpired:
                self.problems.append("the local launcher did not return within 120 s of a cancel")
        self.launch()
        return True

    def readers(self) -> bool:
        s = str(self.sweep.sweep)
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs = [
            subprocess.Popen(self.sweep.cmd(*args), cwd=C.ROOT, env=self.sweep.env, **pipes)
            for args in (("status", s), ("table", s), ("status", s, "--format", "json"))
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            if proc.returncode != 0 or "Traceback" in out + err:
                self.problems.append(f"{' '.join(proc.args[3:5])} exited {proc.returncode}: {err[-500:]}")
        self.say("status, table and status --format json at once")
        return True

    def requeue(self) -> bool:
        running = [(t, st) for t, st in self.sweep.running() if st.get("job_id")]
        if not running:
            return False
        trial, st = self.rng.choice(running)
        done = subprocess.run(["scontrol", "requeue", st["job_id"]], env=self.slurm_env, capture_output=True, text=True)
        self.say(f"scontrol requeue {st['job_id']} (trial {trial.name}): {done.returncode}")
        return done.returncode == 0

    def slurmd(self) -> bool:
        node = self.rng.choice(["n1", "n2"])
        C.slurm_cluster("node-kill", node, env=self.slurm_env, check=False)
        down = self.rng.uniform(5.0, 15.0)
        self.say(f"node {node} killed (slurmd and its jobs); back in {down:.0f} s")
        time.sleep(down)
        C.slurm_cluster("node-start", node, env=self.slurm_env)
        return True


def storm(chaos: Chaos, kinds: list[str], seconds: float) -> None:
    """Faults every 2-8 s until ``seconds`` have passed: each class once (shuffled), then at random.

    Every class comes at least once however long the faults take (on a loaded machine four of them can
    outlast a short storm): the storm ends when the time is up and none is left to draw.
    """
    order = chaos.rng.sample(kinds, len(kinds))
    end = time.monotonic() + seconds
    while order or time.monotonic() < end:
        time.sleep(chaos.rng.uniform(2.0, 8.0))
        kind = order.pop(0) if order else chaos.rng.choice(kinds)
        (chaos.faults if getattr(chaos, kind)() is not False else chaos.missed)[kind] += 1
        if chaos.sweep.backend == "local":
            chaos.launch()  # one that a fault ended is replaced, as its user would


def quiet(sweep: Sweep, chaos: Chaos, timeout: float = 1800) -> None:
    """Until nothing of the sweep runs: the local launcher has returned, or SLURM holds no job of it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sweep.backend == "local":
            if chaos.launcher is None or chaos.launcher.poll() is not None:
                return
        else:
            queued = subprocess.run(["squeue", "-h", "-n", f"lintrans-{NAME}", "-o", "%i"], env=chaos.slurm_env,
                                    capture_output=True, text=True).stdout.strip()  # fmt: skip
            if not queued:
                return
        time.sleep(3)
    chaos.problems.append(f"the sweep still ran {timeout:.0f} s after the storm")


def heal(sweep: Sweep, chaos: Chaos, rounds: int) -> int:
    """``run`` again until every trial is done (or ``rounds`` runs); how many runs it took."""
    for n in range(rounds + 1):
        quiet(sweep, chaos)
        states = sweep.states()
        if states and all(s["state"] == "done" for s in states.values()):
            return n
        chaos.say(f"heal {n + 1}: {dict(Counter(s['state'] for s in states.values()))}; run again")
        chaos.launcher = None
        chaos.launch()
    return rounds


def final_weights(trial: Path) -> dict:
    import torch

    ckpt = torch.load(trial / "checkpoints-meta" / "checkpoint.pth", weights_only=True, map_location="cpu")
    return {"step": ckpt["step"], "model": ckpt["model"], "ema": ckpt["ema"]}


def check(calm: Sweep, chaotic: Sweep, states: dict[str, dict]) -> dict[str, bool | str]:
    """The soak's promises, each True or a line saying what broke it."""
    import torch

    out: dict[str, bool | str] = {}
    not_done = {
        t: " ".join(filter(None, (s["state"], s.get("reason")))) for t, s in states.items() if s["state"] != "done"
    }
    out["every trial done"] = not not_done or f"not done: {not_done}"
    bad_records = []
    for trial in chaotic.trials():
        spec = json.loads((trial / "trial.json").read_text())
        found = sorted(p for p in (trial / "records").glob("*.json") if not p.name.startswith("."))
        steps = {json.loads(p.read_text()).get("run", {}).get("steps") for p in found}
        if len(found) != len(spec["evaluations"]) or steps != {spec["n_iters"]}:
            bad_records.append(f"{trial.name}: {[p.name for p in found]} at steps {steps}")
    out["one record per evaluation"] = not bad_records or "; ".join(bad_records)
    differ = []
    for trial in calm.trials():
        a, b = final_weights(trial), final_weights(chaotic.dir / trial.name)
        same = a["step"] == b["step"] and all(
            torch.equal(a[key][k], b[key][k]) for key in ("model", "ema") for k in a[key]
        )
        if not same:
            differ.append(trial.name)
    out["weights bitwise equal to the calm run"] = not differ or f"differ: {differ}"
    temps = [str(p) for p in chaotic.runs.rglob("*.tmp")]
    out["no temp file left"] = not temps or f"left: {temps[:5]}"
    return out


def report(a: argparse.Namespace, info: dict, res: dict) -> str:
    checks = "\n".join(f"- {'PASS' if v is True else 'FAIL'}: {k}" + ("" if v is True else f" ({v})")
                       for k, v in res["checks"].items())  # fmt: skip
    faults = C.md_table(
        ["fault", "injected", "drawn with no target"],
        [[k, res["faults"].get(k, 0), res["missed"].get(k, 0)] for k in res["kinds"]],
    )
    return (
        C.header_md(f"Chaos soak on the {a.backend} backend", info)
        + f"{a.trials} trials of {a.steps} steps (a checkpoint every 5), seed {a.seed}, "
        f"{a.chaos_s:.0f} s of faults, every 2-8 s.\n\n"
        + faults
        + f"\n\nWall time: calm run {res['calm_s']:.0f} s; chaos run {res['chaos_s']:.0f} s "
        f"(storm and heal, {res['heal_runs']} `run`s after the storm).\n\n"
        + (f"Problems seen on the way: {'; '.join(res['problems'])}\n\n" if res["problems"] else "")
        + checks
        + "\n"
    )


def main() -> int:
    a = parse()
    info = C.machine()
    tmp = Path(tempfile.mkdtemp(prefix="lintrans-chaos-"))
    slurm_env = None
    try:
        sweep_file = write_sweep(tmp, a.trials, a.steps)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        calm = Sweep(tmp / "calm", sweep_file, "local", env, tmp / "calm.log")
        t0 = time.perf_counter()
        calm_run = calm.call("run", str(sweep_file), "--backend", "local", timeout=3600)
        calm_s = time.perf_counter() - t0
        if calm_run.returncode != 0:
            print(calm_run.stdout[-3000:] + calm_run.stderr[-3000:], file=sys.stderr)
            return 1
        print(f"calm run: {a.trials} trials in {calm_s:.0f} s", flush=True)
        if a.backend == "slurm":
            slurm_env = C.start_slurm(2, LINTRANS_SLURM_CPUS="2")
            env = {**slurm_env, "PYTHONUNBUFFERED": "1"}
        chaotic = Sweep(tmp / "chaos", sweep_file, a.backend, env, tmp / "chaos.log")
        chaos = Chaos(chaotic, random.Random(a.seed), slurm_env)
        kinds = SLURM_FAULTS if a.backend == "slurm" else LOCAL_FAULTS
        t0 = time.perf_counter()
        chaos.launch()
        storm(chaos, kinds, a.chaos_s)
        heal_runs = heal(chaotic, chaos, a.heal_rounds)
        chaos_s = time.perf_counter() - t0
        res = {
            "backend": a.backend, "trials": a.trials, "steps": a.steps, "seed": a.seed, "chaos_s_asked": a.chaos_s,
            "kinds": kinds, "faults": dict(chaos.faults), "missed": dict(chaos.missed), "problems": chaos.problems,
            "calm_s": calm_s, "chaos_s": chaos_s, "heal_runs": heal_runs,
            "checks": check(calm, chaotic, chaotic.states()), "machine": info,
        }  # fmt: skip
        if chaos.problems:
            res["checks"]["no command failed on the way"] = "; ".join(chaos.problems)
        name = NAME if a.backend == "local" else f"{NAME}_{a.backend}"
        C.write_results(name, res, report(a, info, res), folder=a.out)
        for what, verdict in res["checks"].items():
            print(f"PASS: {what}" if verdict is True else f"FAIL: {what} ({verdict})")
        return 0 if all(v is True for v in res["checks"].values()) else 1
    finally:
        if slurm_env is not None:
            C.cancel_all(slurm_env)
            C.slurm_cluster("stop", env=slurm_env, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
