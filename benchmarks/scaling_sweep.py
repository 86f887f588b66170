#!/usr/bin/env python
"""A small-scale compute sweep, as an example of planning a bigger run: 3-4 model sizes x 2-3 fixed CPU-second
budgets on one dataset (benchmarks/quality.py's runs: one pinned core, stopped by --max-cpu-seconds, scored on
the whole validation text), then a least-squares fit of the compute-efficient frontier, loss = a * C^(-b)
(+ floor with --floor), C = a run's CPU-seconds at its last step (its process's, startup included).

    python benchmarks/scaling_sweep.py                                  # 4 sizes x 30/100/300 CPU-s, shakespeare
    python benchmarks/scaling_sweep.py --quick --dataset test=DIR       # CI-sized

For each budget the frontier point is the size with the lowest validation bits per byte; the fit is over those
points (log-log least squares; with --floor, the floor that leaves the smallest residual, searched on a grid below
the lowest loss). Every size uses the same recipe, launch/recipes/default.yaml, its step cap lifted (--max-steps):
every run ends at its budget, its cooldown in the budget's last 20% (--decay-in-budget).
Writes YYYY-MM-DD-scaling-<host>[-TAG].{md,json} to --results-dir.
"""

from __future__ import annotations

import datetime
import json
import math
import shlex
import sys
import tempfile
from pathlib import Path

import quality

from dsllm.errors import ArgumentParser, UserError, run_cli

SIZES = {  # tiny-shaped (llama-style, 64-dim heads); `tiny` itself is the largest
    "d64-l2": ["--model.d_model", "64", "--model.n_layers", "2", "--model.n_heads", "1", "--model.n_kv_heads", "1"],
    "d128-l2": ["--model.d_model", "128", "--model.n_layers", "2", "--model.n_heads", "2", "--model.n_kv_heads", "2"],
    "d192-l3": ["--model.d_model", "192", "--model.n_layers", "3", "--model.n_heads", "3", "--model.n_kv_heads", "3"],
    "d256-l4": ["--model.d_model", "256", "--model.n_layers", "4", "--model.n_heads", "4", "--model.n_kv_heads", "2"],
}
QUICK_SIZES = {  # (--quick: on top of quality.QUICK_ARGS' tiny model)
    "d32-l1": ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "2"],
    "d64-l2": [],
}


def fit_power_law(compute: list[float], loss: list[float], floor: bool = False) -> dict:
    """Least squares of log(loss - floor) = log(a) - b log(C): {"a", "b", "floor", "rms"} (rms of the log
    residuals). With `floor`, the floor in [0, min(loss)) with the smallest residual (a grid, then a finer one
    around the best)."""
    import numpy as np

    c, y = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    if len(c) < 2 or len(set(c.tolist())) < 2:
        raise ValueError("a fit needs at least two different compute values")

    def line(e: float):
        design = np.stack([np.ones_like(c), -np.log(c)], axis=1)
        target = np.log(y - e)
        (log_a, b), *_ = np.linalg.lstsq(design, target, rcond=None)
        rms = float(np.sqrt(np.mean((design @ np.array([log_a, b]) - target) ** 2)))
        return {"a": float(np.exp(log_a)), "b": float(b), "floor": float(e), "rms": rms}

    best = line(0.0)
    if floor and len(c) >= 3:
        top = float(y.min())
        lo, hi = 0.0, top
        for _ in range(3):  # a grid, then finer grids around the best floor
            grid = np.linspace(lo, hi, 201)[:-1]
            candidates = [line(float(e)) for e in grid if e < top]
            best = min([best, *candidates], key=lambda f: f["rms"])
            step = (hi - lo) / 200
            lo, hi = max(0.0, best["floor"] - step), min(top, best["floor"] + step)
    return best


def frontier(points: list[dict]) -> list[dict]:
    """The lowest-loss run of each budget."""
    best = {}
    for p in points:
        if p["budget"] not in best or p["bpb"] < best[p["budget"]]["bpb"]:
            best[p["budget"]] = p
    return [best[b] for b in sorted(best)]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="benchmarks/scaling_sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="30,100,300", help="comma-separated CPU-seconds per run")
    parser.add_argument("--sizes", help=f"comma-separated, of {', '.join(SIZES)} (default: all)")
    parser.add_argument("--datasets", default="shakespeare", help="one of shakespeare, stdlib (or --dataset)")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=DIR", help="a prepared dataset")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=1_000_000,
        help="the recipe's step cap (default: one no budget reaches, so every run ends at its budget, its decay in "
        "the budget's last 20%%: --decay-in-budget)",
    )
    parser.add_argument("--floor", action="store_true", help="fit an irreducible floor too")
    parser.add_argument("--core", type=int, help="the core each run is pinned to (default: the first allowed)")
    parser.add_argument("--shakespeare", default=str(quality.SHAKESPEARE), help="tinyshakespeare.txt")
    parser.add_argument("--vocab-size", type=int, default=1024, help="the shakespeare tokenizer's vocabulary")
    parser.add_argument("--quick", action="store_true", help="CI-sized: 2 tiny sizes x 5 and 10 CPU-s")
    parser.add_argument("--work-dir", help="run folders (default: a temporary folder)")
    parser.add_argument("--results-dir", default=str(quality.REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", help="added to the result file's name")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        unknown = [s for s in args.sizes.split(",") if s not in sizes]
        if unknown:
            raise UserError(f"--sizes {','.join(unknown)}: unknown; use {', '.join(sizes)}")
        sizes = {s: sizes[s] for s in args.sizes.split(",")}
    budgets = [float(b) for b in ("5,10" if args.quick and args.budgets == "30,100,300" else args.budgets).split(",")]
    if len(budgets) < 2:
        raise UserError(f"--budgets {args.budgets}: give at least two budgets to fit a slope")
    settings = quality.build_parser().parse_args([])  # quality.py's settings for its runs
    settings.quick, settings.budget_kind, settings.seeds = args.quick, "cpu", 1
    settings.datasets, settings.dataset, settings.shakespeare, settings.vocab_size = (
        args.datasets,
        args.dataset,
        args.shakespeare,
        args.vocab_size,
    )
    datasets = quality.resolve_datasets(settings, lambda m: print(m, file=sys.stderr, flush=True))
    name, data = next(iter(datasets.items()))
    core = args.core if args.core is not None else min(quality.os.sched_getaffinity(0))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dsllm-scaling-"))
    started = datetime.datetime.now()
    points = []
    for size, model in sizes.items():
        recipe = [*quality.BUILTIN_RECIPES["dsllm-default"]]
        recipe += ["--max-steps", str(args.max_steps)]
        recipe += ["--model.mlp_multiple_of", "32", *model]
        for budget in budgets:
            settings.budget = budget
            out = work / size / f"{budget:g}"
            run = quality.dsllm_run(recipe, data, out, 1234, settings, core)
            print(
                f"{size:>8} {budget:>6g} CPU-s: val bpb {run['bpb']:.4f} ({run['steps']} steps, "
                f"{run['cpu_seconds']:.1f} CPU-s)",
                file=sys.stderr,
                flush=True,
            )
            kept = ("bpb", "steps", "cpu_seconds", "cpu_seconds_at_stop")
            points.append({"size": size, "budget": budget, **{k: run[k] for k in kept}})
    best = frontier(points)
    fit = fit_power_law([p["cpu_seconds_at_stop"] for p in best], [p["bpb"] for p in best], floor=args.floor)
    result = {
        "benchmark": "scaling",
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "git_revision": quality.git_revision(),
        "dataset": {name: str(data)},
        "sizes": sizes,
        "budgets": budgets,
        "points": points,
        "frontier": best,
        "fit": fit,
    }
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    stem = (
        Path(args.results_dir) / f"{started.date()}-scaling-{quality.host_slug()}{'-' + args.tag if args.tag else ''}"
    )
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Compute sweep on {name}, {started.date()}",
        "",
        f"Command: `{result['command']}`, git {result['git_revision']}",
        "",
        "| size | budget CPU-s | CPU-s at the last step (C) | CPU-s in all | steps | val bpb (whole val text) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {p['size']} | {p['budget']:g} | {p['cpu_seconds_at_stop']:.1f} | {p['cpu_seconds']:.1f} | "
            f"{p['steps']} | {p['bpb']:.4f} |"
            for p in points
        ),
        "",
        f"Frontier fit: bpb = {fit['a']:.4g} * C^(-{fit['b']:.4f}) + {fit['floor']:.4g} (rms of log residuals "
        f"{fit['rms']:.3g}), over the best size of each budget.",
        "",
    ]
    Path(f"{stem}.md").write_text("\n".join(lines))
    finite = math.isfinite(fit["b"])
    print(f"fitted exponent b = {fit['b']:.4f} (bpb = {fit['a']:.4g} * C^-b + {fit['floor']:.4g})")
    print(f"wrote {stem}.md and .json", file=sys.stderr)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
