"""The README's main job timed end to end, at one revision or at two in alternating rounds.

    .venv/bin/python bench/quickstart.py --base 36d9bce      # HEAD against 36d9bce, 2 rounds (~15 min here)
    .venv/bin/python bench/quickstart.py                     # HEAD alone, 2 rounds
    .venv/bin/python bench/quickstart.py --quick             # smoke run: 2 trials of 2 steps, HEAD, 1 round

Each revision is checked out with ``git worktree add --detach`` into a temporary folder, and the job
is what README's first command runs after set-up: ``python -m launchers run sweeps/quickstart.yaml
--backend local --runs-dir <empty folder>``, started in that folder with this interpreter and an empty
feature cache. ``-m`` puts the folder first on ``sys.path``, so each revision runs its own
``launchers`` and ``lintrans`` on the same installed packages; every trial's ``provenance.json`` must
name the revision's commit, or the bench fails. Within a round the revisions run one after the other,
in an order that rotates per round, and a ratio is taken within its round (base wall / revision wall:
above 1 is faster). The results table of each run (``lintrans table --format json``) is kept, and the
bench checks that every run ranks the forward processes by ``nll_bpd`` the same way at each ``K``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

SWEEP = "sweeps/quickstart.yaml"
QUICK_SWEEP = "sweeps/bench_quick.yaml"  # written into each checkout by --quick


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default="HEAD", help="the revision timed (git rev)")
    p.add_argument("--base", default=None, help="a revision to time beside it, alternating (default: none)")
    p.add_argument("--rounds", type=int, default=2, help="rounds: one run of each revision per round")
    p.add_argument("--quick", action="store_true", help="smoke run: heat and velocity at K=2, 2 steps, 1 round")
    p.add_argument("--name", default="quickstart")
    a = p.parse_args()
    if a.quick:
        a.rounds = 1
    return a


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=C.ROOT, check=True, capture_output=True, text=True).stdout.strip()


def write_quick_sweep(checkout: Path) -> str:
    """The revision's own quickstart sweep cut to 2 trials of 2 steps with small evaluations."""
    import yaml

    sweep = yaml.safe_load((checkout / SWEEP).read_text())
    sweep["name"] = "bench_quick"
    sweep["axes"] = {"model.forward": ["heat", "constant_velocity"], "model.K": [2]}
    sweep["overrides"].update({f"training.{k}": 2 for k in ("n_iters", "eval_freq", "sampling_freq", "snapshot_freq")})
    sweep["overrides"].update({"eval.num_batches": 1, "training.snapshot_freq_for_preemption": 2})
    sweep["evaluations"] = [
        {"mode": "elbo", "num_test": 4, "num_train": 50},
        {"mode": "fid", "num_gen": 8, "batch_size": 8},
    ]
    (checkout / QUICK_SWEEP).write_text(yaml.safe_dump(sweep, sort_keys=False))
    return QUICK_SWEEP


def run_job(checkout: Path, sweep: str, sha: str, runs: Path) -> dict:
    """One run of the main job in ``checkout``: its wall time and results table.

    Its feature cache (``lintrans.feature_cache``) starts empty, as on a fresh machine.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout's code, nothing else's
    env["LINTRANS_CACHE_DIR"] = str(runs.with_name(f"{runs.name}-cache"))
    lintrans, where = [sys.executable, "-m", "launchers"], ["--runs-dir", str(runs)]
    start = time.perf_counter()
    job = subprocess.run([*lintrans, "run", sweep, "--backend", "local", *where], cwd=checkout, env=env,
                         capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if job.returncode:
        raise SystemExit(
            f"the main job failed at {sha[:12]} (exit {job.returncode}):\n{job.stdout[-3000:]}{job.stderr[-3000:]}"
        )
    table = subprocess.run([*lintrans, "table", sweep, *where, "--format", "json"], cwd=checkout, env=env, check=True,
                           capture_output=True, text=True)  # fmt: skip
    ran = {json.loads(p.read_text())["commit"] or "none" for p in runs.rglob("provenance.json")}
    if not ran or any(not sha.startswith(c) for c in ran):  # a clean checkout of sha: its 12 digits, no "+dirty"
        raise SystemExit(
            f"trials ran commit(s) {sorted(ran)}, not {sha[:12]}: the checkout's code was not the one imported"
        )
    return {"wall_s": wall, "rows": json.loads(table.stdout)}


def ranking(rows: list[dict]) -> dict[str, list[str]]:
    """Per ``K``, the forward processes from lowest to highest ``nll_bpd``."""
    by_k: dict[str, list[dict]] = {}
    for r in rows:
        by_k.setdefault(str(r["K"]), []).append(r)
    return {k: [r["forward"] for r in sorted(rs, key=lambda r: r["nll_bpd"])] for k, rs in sorted(by_k.items())}


def commit_of(rev: str, flag: str) -> str:
    """The commit ``rev`` names (a tag names its commit, not the tag object); exit 2 if it names none."""
    try:
        return git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"error: {flag} {rev!r} is not a commit of {C.ROOT}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    a = parse()
    info = C.machine()
    revs = {"rev": commit_of(a.rev, "--rev")} | ({"base": commit_of(a.base, "--base")} if a.base else {})
    if info["commit"].endswith("+dirty"):  # provenance.commit() has looked
        print(
            f"note: this checkout has uncommitted changes; the bench times commits only ({a.rev} = {revs['rev'][:12]})"
        )
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # a plain kill still removes the worktrees
    git("worktree", "prune")  # entries of checkouts that a killed run left behind
    runs: dict[str, list[dict]] = {name: [] for name in revs}
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-", ignore_cleanup_errors=True) as tmp:
        checkouts = {}
        try:
            for name, sha in revs.items():
                checkouts[name] = Path(tmp) / name
                git("worktree", "add", "--detach", str(checkouts[name]), sha)
            sweeps = {name: write_quick_sweep(c) if a.quick else SWEEP for name, c in checkouts.items()}
            order = list(revs)
            for r in range(a.rounds):
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    out = run_job(checkouts[name], sweeps[name], revs[name], Path(tmp) / f"runs-{name}-{r}")
                    runs[name].append(out)
                    print(f"round {r + 1}/{a.rounds}: {name} {revs[name][:12]} {out['wall_s']:.1f} s", flush=True)
        finally:
            for c in checkouts.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(c)], cwd=C.ROOT, capture_output=True)
            git("worktree", "prune")

    walls = {name: [o["wall_s"] for o in outs] for name, outs in runs.items()}
    rankings = [ranking(o["rows"]) for outs in runs.values() for o in outs]
    same_ranking = all(rk == rankings[0] for rk in rankings)
    result = {
        "machine": info,
        "quick": a.quick,
        "revisions": revs,
        "walls_s": walls,
        "median_s": {name: statistics.median(w) for name, w in walls.items()},
        "ranking": rankings[0],
        "same_ranking": same_ranking,
        "tables": {name: [o["rows"] for o in outs] for name, outs in runs.items()},
    }
    rows = [[name, revs[name][:12], f"{result['median_s'][name]:.1f}", ", ".join(f"{w:.1f}" for w in walls[name])]
            for name in revs]  # fmt: skip
    md = C.header_md("The main job (README's first command after set-up), end to end", info)
    md += f"Sweep `{sweeps['rev']}`, local backend, an empty runs folder per run; {a.rounds} round(s).\n\n"
    md += C.md_table(["revision", "commit", "median s", "each round, s"], rows) + "\n"
    if a.base:
        ratios = [b / w for b, w in zip(walls["base"], walls["rev"], strict=True)]
        fast = result["speedup"] = C.spread(ratios)
        md += (f"\nSpeed-up of `{a.rev}` over `{a.base}` (base wall / revision wall, within each round): "
               f"**{fast['median']:.2f}×** ({fast['min']:.2f}–{fast['max']:.2f}).\n")  # fmt: skip
    md += f"\nRanking by nll_bpd per K (lowest first): {rankings[0]}; the same in every run: {same_ranking}.\n"
    C.write_results(a.name, result, md)
    if not same_ranking:
        raise SystemExit("the runs rank the forward processes differently")


if __name__ == "__main__":
    main()
