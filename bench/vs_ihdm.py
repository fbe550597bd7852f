"""lintrans's training step against IHDM's own, on the same CPU, in one process, in alternating rounds.

    git clone https://github.com/AaltoML/generative-inverse-heat-dissipation /tmp/ihdm
    IHDM_PATH=/tmp/ihdm .venv/bin/python bench/vs_ihdm.py            # small_mnist + default_mnist, batch 32, 5 rounds
    IHDM_PATH=/tmp/ihdm .venv/bin/python bench/vs_ihdm.py --quick    # smoke run: 1 round, 2 steps, small_mnist
    IHDM_PATH=/tmp/ihdm .venv/bin/python bench/vs_ihdm.py --threads 1 --rounds 7 --configs small_mnist

The default run takes about 20 min on an idle 2-core CPU (an estimate: ``default_mnist`` costs about 7x
the FLOPs of ``small_mnist`` per step); ``--quick`` about half a minute there.

IHDM (Rissanen et al., ICLR 2023) is imported from the checkout that ``IHDM_PATH`` names (without
it, or with a path that is not such a checkout, the script says so in one line and exits with 2);
none of its code is copied here. Its training step is built exactly as its ``train.py`` builds it,
from its own config files (``configs/mnist/small_mnist.py``, ``default_mnist_configs.py``) and
functions: ``model_code.utils.create_model`` (its U-Net, wrapped in ``DataParallel`` as IHDM does),
``scripts.losses.get_optimizer`` / ``optimization_manager`` / ``get_step_fn`` (its loss, with the
heat blur of ``create_forward_process_from_sigmas``, and its warm-up/clip/Adam update),
``model_code.ema.ExponentialMovingAverage``; each step takes ``batch.to(device).float()`` and
reads ``loss.item()`` as ``train.py``'s loop does. It is timed as it is, on the CPU, in fp32: its
DCT blur runs in float64 (the blur sigmas are a float64 tensor), it blurs the batch twice, and it
trains levels 1..K-1. Only the modules the step needs are imported (not ``scripts.utils`` or
``scripts.datasets``, which want cv2/mpi4py for logging and data loading).

lintrans's step is :class:`lintrans.step.TrainStep`, built by ``_common.train_step`` as in
``bench/train_throughput.py``, from the mirrored configs ``configs/mnist/small_mnist.py`` and
``configs/mnist/default_mnist_configs.py``, in fp32 and in ``mixed_precision=auto`` (bf16 autocast
where the CPU has AVX512-BF16 or AMX, else fp32: ``lintrans.device.use_bf16``). Both steps see the
same mnist5k batches (``GlobalBatchSampler``, same seed) and the same ``torch.set_num_threads``.

Each round times, per config, IHDM fp32, lintrans fp32, lintrans auto (``--round-warmup`` untimed
steps, then ``--steps`` timed ones each), after measuring the dense matmul peak (fp32 and bf16) in
that round; so slow drifts of this shared machine hit all three alike. The order rotates from round
to round (round 2 starts with lintrans fp32, round 3 with lintrans auto), so that no variant always
runs first after the peak measurement. Reported: img/s per round (median step), the ratios
lintrans/IHDM per round with median and min-max over rounds, model FLOPs per step
(``FlopCounterMode``, forward + backward; the FFT blur is not counted) and the achieved fraction of
the round's matmul peak of the step's dtype. ``--device cpu`` (the default) hides CUDA
(IHDM's ``DataParallel`` would spread a CPU model over GPUs); ``--device cuda`` runs both on the
first GPU, where lintrans auto is bf16 (``training.compile: auto`` trains eager; where it compiles, the
first, compiling step is reported apart).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import shlex
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import _common as C
import torch

IHDM_URL = "https://github.com/AaltoML/generative-inverse-heat-dissipation"
# name -> (lintrans config file, IHDM config module)
CONFIGS = {
    "small_mnist": ("configs/mnist/small_mnist.py", "configs.mnist.small_mnist"),
    "default_mnist": ("configs/mnist/default_mnist_configs.py", "configs.mnist.default_mnist_configs"),
}
IHDM_MODULES = ("scripts.losses", "model_code.utils", "model_code.ema", *(m for _, m in CONFIGS.values()))
IHDM_FILES = ("model_code/unet.py", "model_code/utils.py", "scripts/losses.py", "configs/mnist/small_mnist.py")
SHADOWED = ("configs", "scripts", "model_code")  # top-level package names both repositories use
VARIANTS = ("ihdm_fp32", "lintrans_fp32", "lintrans_auto")
# Values IHDM's and lintrans's configs must share for the comparison to be like for like.
MIRRORED = (
    "seed", "data.image_size", "data.num_channels", "data.random_flip", "data.uniform_dequantization",
    "model.K", "model.sigma", "model.blur_sigma_min", "model.blur_sigma_max", "model.dropout",
    "model.model_channels", "model.channel_mult", "model.num_res_blocks", "model.attention_levels",
    "model.num_heads", "model.num_head_channels", "model.conv_resample", "model.use_scale_shift_norm",
    "model.ema_rate", "optim.optimizer", "optim.lr", "optim.beta1", "optim.eps", "optim.warmup",
    "optim.grad_clip", "optim.weight_decay",
)  # fmt: skip


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="rounds of IHDM fp32, lintrans fp32, lintrans auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after building it")
    p.add_argument("--round-warmup", type=int, default=1, help="untimed steps per variant at the start of a round")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, the same for both")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both steps run")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="matmul peak measurement per dtype per round")
    p.add_argument("--quick", action="store_true", help="smoke run (seconds): 1 round, 2 steps, small_mnist")
    p.add_argument("--name", default="vs_ihdm", help="result file stem under bench/results/")
    a = p.parse_args()
    if a.quick:
        a.configs, a.rounds, a.steps, a.warmup, a.round_warmup, a.peak_seconds = "small_mnist", 1, 2, 1, 0, 0.3
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; valid: {', '.join(CONFIGS)}")
    return a


def die(message: str) -> None:
    print(f"vs_ihdm: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- IHDM, imported from IHDM_PATH


def import_ihdm() -> tuple[dict, dict]:
    """IHDM's modules the training step needs, imported from ``IHDM_PATH``, and where they came from.

    IHDM's packages ``configs`` and ``scripts`` have the names of lintrans's; they are imported with
    lintrans's root off ``sys.path`` and lintrans's own modules of those names set aside, which are
    put back afterwards (IHDM's functions keep their own module globals).
    """
    path = os.environ.get("IHDM_PATH", "")
    if not path:
        die(f"IHDM_PATH is not set; point it at a checkout of {IHDM_URL}")
    root = Path(path).expanduser().resolve()
    missing = [f for f in IHDM_FILES if not (root / f).is_file()]
    if missing:
        die(f"IHDM_PATH={path} is not a checkout of {IHDM_URL} (no {', '.join(missing)})")
    ours = {n: m for n, m in sys.modules.items() if n.split(".")[0] in SHADOWED}
    saved_path = sys.path[:]
    here = {C.ROOT.resolve(), Path.cwd().resolve()}
    sys.path[:] = [str(root)] + [p for p in saved_path if p not in ("", ".") and Path(p).resolve() not in here]
    for n in ours:
        del sys.modules[n]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mods = {n: importlib.import_module(n) for n in IHDM_MODULES}
    except Exception as exc:  # noqa: BLE001 - one line, whatever IHDM's import raises
        text = str(exc).splitlines()[0] if str(exc) else ""
        die(f"cannot import IHDM from IHDM_PATH={path}: {type(exc).__name__}: {text}")
    finally:
        sys.path[:] = saved_path
        for n in [n for n in sys.modules if n.split(".")[0] in SHADOWED]:
            del sys.modules[n]
        sys.modules.update(ours)
    strays = [n for n, m in mods.items() if not Path(m.__file__).resolve().is_relative_to(root)]
    if strays:
        die(f"IHDM modules {', '.join(strays)} did not come from IHDM_PATH={path}")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return mods, {"path": str(root), "commit": commit, "repository": IHDM_URL}


class IhdmStep:
    """One iteration of IHDM's ``train.py`` loop: ``train_step_fn(state, batch)`` and ``loss.item()``."""

    def __init__(self, mods: dict, module: str, batch_size: int, train_set, device: torch.device) -> None:
        from lintrans import datasets

        losses, mutils = mods["scripts.losses"], mods["model_code.utils"]
        cfg = mods[module].get_config()
        cfg.device = device
        cfg.training.batch_size = batch_size
        torch.manual_seed(cfg.seed)
        model = mutils.create_model(cfg)
        optimizer = losses.get_optimizer(cfg, model.parameters())
        ema = mods["model_code.ema"].ExponentialMovingAverage(model.parameters(), decay=cfg.model.ema_rate)
        self.state = dict(optimizer=optimizer, model=model, step=0, ema=ema)
        optimize_fn = losses.optimization_manager(cfg)
        scales = cfg.model.blur_schedule
        heat_forward_module = mutils.create_forward_process_from_sigmas(cfg, scales, cfg.device)
        with warnings.catch_warnings():  # its torch.cuda.amp.GradScaler(), unused in fp32: deprecated, no CUDA
            warnings.simplefilter("ignore")
            self.fn = losses.get_step_fn(
                train=True, scales=scales, config=cfg, optimize_fn=optimize_fn, heat_forward_module=heat_forward_module
            )
        self.config, self.model, self.device = cfg, model, cfg.device
        self.blur_dtype = str(heat_forward_module.blur_sigmas.dtype).replace("torch.", "")
        sampler = datasets.GlobalBatchSampler(len(train_set), batch_size, 0, 1, cfg.seed)
        self.batches = datasets.batches(train_set, sampler)

    def __call__(self) -> float:
        batch = next(self.batches).to(self.device).float()
        loss, _, _ = self.fn(self.state, batch)
        return loss.item()


# ----------------------------------------------------------------------------- measuring


class _Global:
    """Stands in for ``FlopCounterMode``'s ``ModuleTracker``: every count goes to ``Global`` only."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def flops_per_step(step) -> int:
    """FLOPs executed by one whole step (``FlopCounterMode``'s formulas, totals only).

    The per-module attribution of ``FlopCounterMode`` is left out: its module hooks fail inside
    IHDM's hand-written gradient checkpoint (its attention blocks run their forward under
    ``no_grad`` and again in backward), and only the total is used. The recomputed attention
    forward is counted, as it is executed.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Global()
    with counter:
        step()
    return int(counter.get_total_flops())


def get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return tuple(node) if isinstance(node, list | tuple) else node


def config_check(ihdm_cfg, ours) -> dict:
    """The mirrored values of both configs, and those that differ."""
    values = {k: {"ihdm": get(ihdm_cfg, k), "lintrans": get(ours, k)} for k in MIRRORED}
    return {"values": values, "differ": [k for k, v in values.items() if v["ihdm"] != v["lintrans"]]}


def fmt_spread(s: dict, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
    med, lo, hi = (scale * s[k] for k in ("median", "min", "max"))
    if s["n"] == 1:
        return f"{med:.{digits}f}{suffix}"
    return f"{med:.{digits}f}{suffix} ({lo:.{digits}f}-{hi:.{digits}f})"


def run_config(name: str, a, dev, mods: dict, auto_bf16: bool, auto_compile: bool) -> dict:
    from lintrans import datasets
    from lintrans.config import load

    config_path, module = CONFIGS[name]
    config = load(config_path, {"training.batch_size": a.batch_size})
    train_set = datasets.load(load(config_path, {"training.batch_size": a.batch_size, "data.dataset": "mnist5k"}))[0]
    dtypes = {
        "ihdm_fp32": "float32",
        "lintrans_fp32": "float32",
        "lintrans_auto": "bfloat16" if auto_bf16 else "float32",
    }
    steps = {
        "ihdm_fp32": IhdmStep(mods, module, a.batch_size, train_set, dev),
        "lintrans_fp32": C.train_step(config, dev, train_set, bf16=False),
        "lintrans_auto": C.train_step(config, dev, train_set, bf16=auto_bf16, compile=auto_compile),
    }
    ihdm = steps["ihdm_fp32"]
    blur_dtype = ihdm.blur_dtype
    check = config_check(ihdm.config, config)
    params = {
        "ihdm": sum(p.numel() for p in ihdm.model.parameters()),
        "lintrans": sum(p.numel() for p in steps["lintrans_fp32"].run.model.parameters()),
    }
    print(
        f"{name}: IHDM {mods[module].__file__} vs lintrans {config_path}; params IHDM {params['ihdm']:,}, "
        f"lintrans {params['lintrans']:,}; mirrored values that differ: {', '.join(check['differ']) or 'none'}",
        flush=True,
    )
    flops, compile_s = {}, None
    for v, step in steps.items():  # the counted step is one of the warm-up steps
        if v == "lintrans_auto" and auto_compile:  # compiled: the first step compiles; count on the eager twin
            flops[v] = flops_per_step(C.train_step(config, dev, train_set, bf16=auto_bf16))
            compile_s = C.time_calls(step, dev, 0, 1)[0]
        else:
            flops[v] = flops_per_step(step)
        C.time_calls(step, dev, max(a.warmup - 1, 0), 0)
    print(f"{name}: GFLOP/step " + ", ".join(f"{v} {f / 1e9:.1f}" for v, f in flops.items()), flush=True)

    rounds = []
    for r in range(a.rounds):
        n = 1024 if a.quick else None
        peak = {d: C.matmul_peak(dev, getattr(torch, d), n=n, seconds=a.peak_seconds) for d in ("float32", "bfloat16")}
        res = {}
        names, first = list(steps), r % len(steps)
        order = names[first:] + names[:first]  # no variant always runs first
        for v in order:
            times = C.time_calls(steps[v], dev, a.round_warmup, a.steps)
            med = statistics.median(times)
            res[v] = {
                "dtype": dtypes[v],
                "step_s": times,
                "median_s": med,
                "img_per_s": a.batch_size / med,
                "achieved_flop_s": flops[v] / med,
                "fraction_of_peak": flops[v] / med / peak[dtypes[v]]["flop_s"],
            }
        ratio = {
            "fp32": res["lintrans_fp32"]["img_per_s"] / res["ihdm_fp32"]["img_per_s"],
            "auto": res["lintrans_auto"]["img_per_s"] / res["ihdm_fp32"]["img_per_s"],
        }
        rounds.append(
            {"round": r + 1, "matmul_peak": peak, "variants": res, "ratio_to_ihdm": ratio, "loadavg": os.getloadavg()}
        )
        print(
            f"{name} round {r + 1}/{a.rounds}: img/s "
            + ", ".join(f"{v} {res[v]['img_per_s']:.1f}" for v in VARIANTS)
            + f"; lintrans/IHDM fp32 {ratio['fp32']:.2f}x, auto {ratio['auto']:.2f}x; peak fp32 "
            f"{C.fmt_rate(peak['float32']['flop_s'])}, bf16 {C.fmt_rate(peak['bfloat16']['flop_s'])}",
            flush=True,
        )
    summary = {
        v: {
            "dtype": dtypes[v],
            "img_per_s": C.spread([rd["variants"][v]["img_per_s"] for rd in rounds]),
            "fraction_of_peak": C.spread([rd["variants"][v]["fraction_of_peak"] for rd in rounds]),
            "flops_per_step": flops[v],
        }
        for v in VARIANTS
    }
    summary["ratio_to_ihdm"] = {k: C.spread([rd["ratio_to_ihdm"][k] for rd in rounds]) for k in ("fp32", "auto")}
    del steps, ihdm
    gc.collect()
    return {
        "lintrans_config": config_path,
        "ihdm_config": mods[module].__file__,
        "ihdm_blur_dtype": blur_dtype,
        "config_check": check,
        "params": params,
        "flops_per_step": flops,
        "lintrans_auto_first_step_s": compile_s,
        "rounds": rounds,
        "summary": summary,
    }


# ----------------------------------------------------------------------------- report


def markdown(a, facts: dict, results: dict) -> str:
    info = facts["machine"]
    md = C.header_md("lintrans vs IHDM: training step, same machine, same process", info)
    f = facts["cpu_flags"]
    md += (
        f"- CPU flags: AVX512-BF16 {'yes' if f['avx512_bf16'] else 'no'}, AMX-BF16 {'yes' if f['amx_bf16'] else 'no'}"
        f" (torch CPU capability {facts['cpu_capability']}); lintrans `mixed_precision=auto`, `compile=auto` on "
        f"{facts['device']} -> "
        f"{facts['lintrans_auto']}\n"
        f"- IHDM (`IHDM_PATH`): `{facts['ihdm']['path']}`, commit {facts['ihdm']['commit']} ({IHDM_URL})\n"
        f"- run as: `{facts['command_with_env']}`\n\n"
        f"Batch {a.batch_size}, mnist5k batches (same sampler and seed for both), {a.threads} torch thread(s) for "
        f"both, {a.rounds} round(s); each round measures the matmul peak, then times IHDM fp32, lintrans fp32, "
        f"lintrans auto, in an order that rotates each round ({a.round_warmup} untimed + {a.steps} timed steps "
        "each; img/s from the median step). "
        "IHDM's step is its own (`get_step_fn`, its U-Net, its float64 DCT blur applied twice, its Adam/clip/EMA), "
        "timed as is. Ratio = lintrans img/s / IHDM img/s in the same round. % of peak = model FLOPs per step "
        "(`FlopCounterMode`, forward + backward) / median step time / that round's dense matmul peak of the "
        "step's dtype.\n\n"
    )
    if a.quick:
        md += "**Smoke run (`--quick`: 1 round, 2 steps): it checks that the script runs; no figure here counts.**\n\n"
    for name, r in results.items():
        s = r["summary"]
        md += f"## {name}\n\n"
        md += (
            f"`{r['lintrans_config']}` vs IHDM `{Path(r['ihdm_config']).relative_to(facts['ihdm']['path'])}`; "
            f"parameters: IHDM {r['params']['ihdm']:,}, lintrans {r['params']['lintrans']:,}; mirrored config "
            f"values that differ: {', '.join(r['config_check']['differ']) or 'none'}"
            + (f"; lintrans auto's first (compiling) step {r['lintrans_auto_first_step_s']:.1f} s"
               if r["lintrans_auto_first_step_s"] is not None else "")
            + ".\n\n"
        )  # fmt: skip
        md += C.md_table(
            ["step", "dtype", "img/s median (min-max)", "GFLOP/step", "% of matmul peak", "lintrans / IHDM"],
            [
                [
                    v.replace("_", " ").replace("ihdm", "IHDM"),
                    s[v]["dtype"],
                    fmt_spread(s[v]["img_per_s"], digits=1),
                    round(s[v]["flops_per_step"] / 1e9, 1),
                    fmt_spread(s[v]["fraction_of_peak"], scale=100, digits=1),
                    {"ihdm_fp32": "1 (reference)", "lintrans_fp32": "", "lintrans_auto": ""}[v]
                    or fmt_spread(s["ratio_to_ihdm"]["fp32" if v == "lintrans_fp32" else "auto"], suffix="x"),
                ]
                for v in VARIANTS
            ],
        )
        md += "\nPer round:\n\n"
        md += C.md_table(
            ["round", "IHDM fp32 img/s", "lintrans fp32 img/s", "lintrans auto img/s", "ratio fp32", "ratio auto",
             "peak fp32", "peak bf16"],
            [
                [
                    rd["round"],
                    *(f"{rd['variants'][v]['img_per_s']:.1f}" for v in VARIANTS),
                    f"{rd['ratio_to_ihdm']['fp32']:.2f}x",
                    f"{rd['ratio_to_ihdm']['auto']:.2f}x",
                    C.fmt_rate(rd["matmul_peak"]["float32"]["flop_s"]),
                    C.fmt_rate(rd["matmul_peak"]["bfloat16"]["flop_s"]),
                ]
                for rd in r["rounds"]
            ],
        )  # fmt: skip
        md += "\n"
    return md


def main() -> None:
    a = parse()
    mods, ihdm_facts = import_ihdm()  # before lintrans loads any config: both name a package `configs`
    torch.set_num_threads(a.threads)
    if a.device == "cpu":  # IHDM's DataParallel would spread a CPU model over visible GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    dev = C.device(a.device)
    from lintrans.device import cpu_flags_have_bf16, use_bf16, use_compile

    auto_bf16, auto_compile = use_bf16("auto", dev), use_compile("auto", dev, training=True)
    info = C.machine(dev.type)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    facts = {
        "machine": info,
        "cpu_flags": {
            "avx512_bf16": " avx512_bf16" in cpuinfo,
            "amx_bf16": " amx_bf16" in cpuinfo,
            "avx512f": " avx512f" in cpuinfo,
            "hardware_has_bf16": cpu_flags_have_bf16(),
            "LINTRANS_CPU_BF16": os.environ.get("LINTRANS_CPU_BF16"),
        },
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "lintrans_auto": ("bf16" if auto_bf16 else "fp32") + (", compiled" if auto_compile else ", eager"),
        "device": a.device,
        "ihdm": ihdm_facts,
        "command_with_env": f"IHDM_PATH={shlex.quote(ihdm_facts['path'])} {C.command_line()}",
        "threads": a.threads,
        "batch_size": a.batch_size,
        "data": "mnist5k",
        "rounds": a.rounds,
        "steps_per_round": a.steps,
        "warmup": a.warmup,
        "round_warmup": a.round_warmup,
        "quick": a.quick,
    }
    print(
        f"{info['gpu'] or info['cpu']}, {a.threads} thread(s), ISA {', '.join(info.get('cpu_isa', []))}; "
        "lintrans auto -> "
        f"{facts['lintrans_auto']}; IHDM {ihdm_facts['path']} @ {ihdm_facts['commit'][:12]}",
        flush=True,
    )
    results = {name: run_config(name, a, dev, mods, auto_bf16, auto_compile) for name in a.configs}
    C.write_results(a.name, {**facts, "configs": results}, markdown(a, facts, results))


if __name__ == "__main__":
    main()
