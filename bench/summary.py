"""Rewrite the figures table of ``bench/README.md`` from the latest ``bench/results/*.json``.

    .venv/bin/python bench/summary.py

One row per target of the benchmark issue, each with the figure reached, the target, and the
machine, date and commit of the run that measured it, so the README never quotes a number that
is not in a result file. Missing or failed benchmarks show as such.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
from pathlib import Path

import _common as C

README = C.ROOT / "bench" / "README.md"
BEGIN, END = "<!-- figures: written by bench/summary.py -->", "<!-- end of figures -->"


@functools.cache
def load(name: str) -> dict | None:
    path = C.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_of(data: dict) -> str:
    """When and at which commit: the revision timed where the bench checked one out, else the checkout's."""
    m = data["machine"]
    commit = data.get("revisions", {}).get("rev", "")[:12] or m["commit"]
    return f"{m['date'][:16].replace('T', ' ')}, `{commit}`"


def verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None or not math.isfinite(value):
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "missed"


def rows() -> list[list[str]]:
    out: list[list[str]] = []

    def add(what: str, figure: str, target: str, status: str, data: dict | None, source: str) -> None:
        out.append([what, figure, target, status, run_of(data) if data else "", f"`{source}`"])

    tt = load("train_throughput")
    if tt:
        by = {r["precision"]: r for r in tt["results"]}
        for precision, target in (("fp32", 42), ("bf16", 73)):
            r = by.get(precision)
            if r:
                add(
                    f"training img/s, {precision}, `{Path(tt['config']).name}` batch {tt['batch_size']}",
                    f"{r['img_per_s']:.1f} ({100 * r['fraction_of_peak']:.0f} % of {precision} matmul peak)",
                    f">= {target}",
                    verdict(r["img_per_s"], target, True),
                    tt,
                    "train_throughput.json",
                )
        fp = by.get("fp32")
        if fp:
            shares = ", ".join(f"{k} {100 * v:.1f} %" for k, v in fp["breakdown_share"].items())
            add("share of an fp32 step", shares, "", "", tt, "train_throughput.json")
    pairs = [d for p in sorted(C.RESULTS.glob("bf16_heldout*.json")) if not (d := load(p.stem)).get("quick")]
    if pairs:
        by_precision = [{r["precision"]: r["heldout_loss"] for r in d["runs"]} for d in pairs]
        losses = {prec: [b[prec] for b in by_precision] for prec in ("fp32", "bf16")}
        per_seed = ", ".join(
            f"seed {d.get('seed') if d.get('seed') is not None else 'default'}: "
            f"{100 * d['relative_difference_bf16_vs_fp32']:+.1f} %"
            for d in pairs
        )
        rel = statistics.fmean(losses["bf16"]) / statistics.fmean(losses["fp32"]) - 1.0
        spread = max(losses["fp32"]) / min(losses["fp32"]) - 1.0 if len(pairs) > 1 else float("nan")
        tol = pairs[0]["tolerance"]
        add(
            f"held-out loss bf16 vs fp32 after {pairs[0]['steps']} steps, `{Path(pairs[0]['config']).name}`",
            f"mean over {len(pairs)} seed(s) {100 * rel:+.1f} % ({per_seed}); fp32 seed-to-seed spread "
            + (f"{100 * spread:.1f} %" if math.isfinite(spread) else "n/a"),
            f"within ±{100 * tol:.0f} %",
            "below the noise" if spread > tol else ("met" if abs(rel) <= tol else "missed"),
            pairs[-1],
            "bf16_heldout*.json",
        )
    fw = load("forward_processes")
    if fw:
        for size, w in fw["worst_share"].items():
            is_target = size == fw["target"]["size"]
            add(
                f"forward process, worst share of a step at {size}",
                f"{100 * w['share']:.2f} % ({w['process']})",
                "<= 5 %" if is_target else "",
                verdict(w["share"], fw["target"]["max_share"], False) if is_target else "",
                fw,
                "forward_processes.json",
            )
    for name in ("sampling", "sampling_fid_batch"):  # the trainer's grid batch, and an FID batch
        sp = load(name)
        for r in sp["results"] if sp else []:
            ratio = r.get("vs_fp32_eager")
            baseline = r["precision"] == "fp32" and not r.get("compile")
            figure = f"{r['img_per_s']:.2f}"
            if not baseline and ratio is not None:
                rng = r.get("vs_fp32_eager_range")  # absent in files written before the alternating rounds
                figure += f" ({ratio:.2f}x fp32" + (f", {rng[0]:.2f}-{rng[1]:.2f})" if rng else ")")
            add(
                f"sampling img/s, full K={r['K']} run, {r['precision']}{', compiled' if r.get('compile') else ''}, "
                f"batch {r['batch_size']}",
                figure,
                "" if baseline else ">= 2x fp32",
                "" if baseline else verdict(ratio, 2.0, True),
                sp,
                f"{name}.json",
            )  # fmt: skip
    mk = load("malloc")
    if mk and not mk.get("quick"):
        for measure, r in mk["speedup"].items():
            add(
                f"keeping freed memory (every entry point), {measure.replace('_', ' ')}, {mk['threads']} thread(s)",
                f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}, {len(mk['rounds'])} rounds)",
                "",
                "",
                mk,
                "malloc.json",
            )
    ep = load("elbo_precision")
    if ep and not ep.get("quick"):
        speedups = [r["speedup"] for r in ep["rounds"]]
        add(
            f"ELBO, bf16 vs fp32 network, `{Path(ep['config']).name}` trained {ep['steps']} steps",
            f"{ep['speedup_median']:.2f}x ({min(speedups):.2f}-{max(speedups):.2f}); bound moved "
            f"{ep['worst_bpd_diff']:.4f} bpd",
            f">= 1.5x within {ep['bound_bpd']} bpd",
            "met" if ep["speedup_median"] >= 1.5 and ep["within_bound"] else "missed",
            ep,
            "elbo_precision.json",
        )
    fp = load("fid_precision")
    if fp and not fp.get("quick"):
        groups = fp["by_process"]
        judged = [g for g in groups if g["within_seed_spread"] is not None]
        add(
            f"FID, bf16 vs fp32 sampling, {len(fp['results'])} trained runs, {fp['num_gen']} samples",
            f"largest abs(bf16 - fp32) {max(g['largest_abs_diff'] for g in groups):.2f}; fp32 seed std "
            f"{min(g['fp32']['std'] for g in judged):.2f}-{max(g['fp32']['std'] for g in judged):.2f}"
            if judged
            else "one seed per process: no spread",
            "within the seed spread",
            ("met" if all(g["within_seed_spread"] for g in judged) else "missed") if judged else "not measured",
            fp,
            "fid_precision.json",
        )
    vs = load("vs_ihdm")
    if vs and not vs.get("quick"):
        for config, targets in (
            ("small_mnist", {"fp32": 1.25, "auto": 2.5}),
            ("default_mnist", {"fp32": 1.25, "auto": 3.5}),
        ):
            summary = vs["configs"].get(config, {}).get("summary")
            for precision, target in targets.items() if summary else ():
                r = summary["ratio_to_ihdm"][precision]
                add(
                    f"training step vs IHDM fp32, `{config}`, lintrans {precision}",
                    f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}, {r['n']} rounds)",
                    f">= {target}x",
                    verdict(r["median"], target, True),
                    vs,
                    "vs_ihdm.json",
                )  # fmt: skip
    qs = load("quickstart")
    if qs and not qs.get("quick"):
        median, rounds, fast = qs["median_s"]["rev"], len(qs["walls_s"]["rev"]), qs.get("speedup")
        figure = f"{median:.0f} s (median of {rounds} rounds)"
        if fast:
            base = qs["revisions"]["base"][:7]
            figure += (
                f", {fast['median']:.2f}x ({fast['min']:.2f}-{fast['max']:.2f}) as fast as `{base}` in the same rounds"
            )
        add(
            "the main job (`sweeps/quickstart.yaml`) after set-up, end to end",
            f"{figure}; same ranking: {'yes' if qs['same_ranking'] else 'no'}",
            "<= 90 s",
            verdict(median, 90, False),
            qs,
            "quickstart.json",
        )
    el = load("elbo")
    if el:
        full = max(el["runs"], key=lambda r: (r["num_train"], r["num_test"]))
        add(
            f"ELBO wall time, mnist5k, {full['num_train']} train / {full['num_test']} test images",
            f"{full['wall_s']:.0f} s; T(K) applied to {full['prior_applications']} training images "
            f"(reference: {full['reference_prior_applications']})",
            "pushed forward once",
            "met" if full["prior_applications"] == full["num_train"] else "missed",
            el,
            "elbo.json",
        )
    so = load("sweep_overhead")
    if so:
        parts = so["parts"]
        for part, field, label, target in (
            ("dryrun", "wall_s", "expand + dry-run of {trials} trials", 2.0),
            ("slurm", "submit_s", "submit {trials} trials to the test SLURM cluster", 10.0),
            ("slurm", "dry_run_s", "dry-run of {trials} trials for SLURM", None),
            ("table", "rows_plus_render_md_s", "table over {trials} records", 2.0),
            ("table", "cli_run_dry_done_s", "`run --dry-run` over {trials} done trials (end to end)", None),
        ):
            p = parts.get(part, {})
            value = p.get(field)
            add(
                label.format(trials=p.get("trials", "?")),
                f"{value:.2f} s" if value is not None else p.get("error", "not measured"),
                f"< {target:g} s" if target else "",
                verdict(value, target, False) if target else "",
                so,
                "sweep_overhead.json",
            )
        for backend, target in (("local", 0.5), ("ray", None)):
            p = parts.get(backend, {})
            value = p["points"][-1]["overhead_per_trial_s"] if "points" in p else None
            add(
                f"{backend} launcher overhead per trivial trial",
                f"{value:.2f} s" if value is not None else p.get("error", "not measured"),
                f"< {target:g} s" if target else "",
                verdict(value, target, False) if target else "",
                so,
                "sweep_overhead.json",
            )
    dd = load("ddp_scaling")
    if dd:
        s = dd["summary"]
        add(
            f"DDP scaling, 1 -> 2 processes ({dd['backend']}), global batch {dd['global_batch']}",
            ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in s.items()),
            "",
            "",
            dd,
            "ddp_scaling.json",
        )
    return out


def main() -> None:
    table = C.md_table(["measurement", "figure", "target", "", "run (UTC), commit", "file"], rows())
    machines = {
        (d["machine"]["cpu"], d["machine"]["cpus"], d["machine"].get("gpu"))
        for d in (load(p.stem) for p in sorted(C.RESULTS.glob("*.json")))
        if d
    }
    where = "; ".join(f"{cpu}, {n} CPUs, {'GPU ' + gpu if gpu else 'no GPU'}" for cpu, n, gpu in sorted(machines))
    block = f"{BEGIN}\nMachine: {where}.\n\n{table}{END}"
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = README.with_name(f".{README.name}.tmp")
    tmp.write_text(head + block + tail)
    os.replace(tmp, README)
    print(f"wrote the figures table of {README} ({len(table.splitlines()) - 2} rows)")


if __name__ == "__main__":
    main()
