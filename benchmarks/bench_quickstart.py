"""The quick start's cost and quality: `make demo`'s stages (train, sample, evaluate) on the
quick-start recipe or a variant of it, each in its own process, with the CPU time each used.

    python benchmarks/bench_quickstart.py                          # the recipe as shipped
    python benchmarks/bench_quickstart.py --threads 1 -o train.iterations=6000 --seeds 0,1,2

CPU time (user + sys of the child process) is the figure that survives a shared machine:
wall time there depends on the other jobs. `--threads 1` runs every stage on one thread, so
the CPU time is the work itself, not the spin-waiting of idle threads, and bounds the wall time
on a quiet machine (benchmarks/README.md#quick-start). Each sample seed is sampled and
evaluated separately; the table gives the evaluation's figures against held-out real data.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart_digits.yaml"


def demo_requirements(tolerance: float) -> list[str]:
    """`make demo`'s --require gates, with the tolerance below held-out real data."""
    return [f"precision>=heldout-{tolerance:g}", f"recall>=heldout-{tolerance:g}",
            "classes_present>=10"]


def run_stage(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> dict:
    """Run one stage in its own process: its CPU seconds (user + sys of the finished child),
    wall seconds, the 1-minute load average before and after, and its standard output."""
    before, load0, t0 = _children_cpu(), os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode not in ok:
        sys.exit(f"bench_quickstart: {' '.join(cmd[2:4])} failed:\n{proc.stderr[-2000:]}")
    return {"cpu_s": _children_cpu() - before, "wall_s": time.perf_counter() - t0,
            "load": (load0, os.getloadavg()[0]), "out": proc.stdout}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for training (and so for the run)")
    ap.add_argument("-s", dest="sample_overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override for sampling only (sampler.*)")
    ap.add_argument("--seeds", default="0", help="sample seeds, comma-separated")
    ap.add_argument("-n", type=int, default=None, help="samples per seed (default: the recipe's)")
    ap.add_argument("--tolerance", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=None,
                    help="1: every stage on one thread (OMP_NUM_THREADS=1, no batch split)")
    ap.add_argument("--run-dir", default=None, help="default: a temporary directory")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    train_threads, sample_threads = [], []
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        train_threads = ["-o", f"train.batch_threads={args.threads}"]
        sample_threads = ["-o", f"sample.batch_threads={args.threads}"]
    tmp = tempfile.TemporaryDirectory(prefix="bench_quickstart_")
    run_dir = Path(args.run_dir or tmp.name) / "run"
    scoretk = [sys.executable, "-m", "scoretk"]
    overrides = [x for o in args.overrides for x in ("-o", o)]
    stages = {"train": run_stage([*scoretk, "train", args.recipe, "--run-dir", str(run_dir),
                                  "--restart", *overrides, *train_threads], env)}
    results = []
    for seed in args.seeds.split(","):
        out = run_dir.parent / f"samples-{seed}.h5"
        sample_overrides = [x for o in args.sample_overrides for x in ("-o", o)]
        stages[f"sample {seed}"] = run_stage(
            [*scoretk, "sample", "--run", str(run_dir), "--out", str(out), "--force",
             "--seed", seed, *(["-n", str(args.n)] if args.n else []), *sample_overrides,
             *sample_threads], env)
        stages[f"evaluate {seed}"] = ev = run_stage(
            [*scoretk, "evaluate", str(out), "--json", "--features", "pixels",
             *(x for req in demo_requirements(args.tolerance) for x in ("--require", req))],
            env, ok=(0, 1))
        results.append((seed, json.loads(ev["out"])))
    print_tables(args, stages, results)
    tmp.cleanup()
    return {"stages": stages, "results": results}


def print_tables(args, stages: dict, results: list) -> None:
    print(f"recipe {args.recipe} {' '.join(args.overrides)} | threads "
          f"{args.threads or 'default'} | {os.cpu_count()} CPUs")
    print(f"{'stage':<14}{'CPU s':>8}{'wall s':>8}{'load':>12}")
    for name, st in stages.items():
        print(f"{name:<14}{st['cpu_s']:>8.1f}{st['wall_s']:>8.1f}"
              f"{st['load'][0]:>6.1f}{st['load'][1]:>6.1f}")
    train = stages["train"]["cpu_s"]
    per_seed = sum(st["cpu_s"] for k, st in stages.items() if k != "train") / len(results)
    print(f"demo CPU s (train + one sample + one evaluation): {train + per_seed:.1f}")
    print(f"{'seed':<6}{'precision':>10}{'recall':>8}{'real P':>8}{'real R':>8}"
          f"{'classes':>9}  verdict")
    for seed, res in results:
        held = res["heldout"]
        print(f"{seed:<6}{res['precision']:>10.3f}{res['recall']:>8.3f}{held['precision']:>8.3f}"
              f"{held['recall']:>8.3f}{res.get('classes_present', '-'):>9}  "
              f"{'PASS' if res['pass'] else 'FAIL'}")


if __name__ == "__main__":
    main()
