"""Start-up time of the command line: `scoretk --help` and `scoretk plugins`, each a fresh
subprocess, median of --repeats runs (after one untimed run that warms the OS file cache),
next to `python -c pass` and `python -c "import torch"` for scale.

    python benchmarks/bench_startup.py
    python benchmarks/bench_startup.py --importtime   # also: the slowest imports of --help
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: I001  (puts the checkout on sys.path)

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "scoretk --help": [sys.executable, "-m", "scoretk", "--help"],
    "scoretk plugins": [sys.executable, "-m", "scoretk", "plugins"],
}


def run_once(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.ROOT)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"bench_startup: {' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return elapsed


def slowest_imports(env: dict, top: int, *cli: str) -> list[tuple[float, str]]:
    """(cumulative seconds, module) of the slowest imports of `scoretk CLI...` (-X importtime)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "scoretk", *cli],
                         capture_output=True, text=True, env=env, cwd=common.ROOT)
    rows = []
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and len(m.group(2)) <= 3:  # top-level and first-level imports only
            rows.append((int(m.group(1)) / 1e6, m.group(2).replace(" ", "·") + m.group(3)))
    return sorted(rows, reverse=True)[:top]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--importtime", action="store_true",
                   help="also list the slowest imports behind each scoretk command")
    args = p.parse_args(argv)
    import torch

    common.header("CLI start-up time (fresh subprocess each run)", torch.device("cpu"),
                  repeats=args.repeats)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(common.ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    commands = dict(COMMANDS)
    script = shutil.which("scoretk", path=str(Path(sys.executable).parent))
    if script:
        commands["scoretk --help (console script)"] = [script, "--help"]
    for cmd in commands.values():  # warm the file cache, check they work
        run_once(cmd, env)
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.repeats):  # interleaved, so load bursts hit all alike
        for name, cmd in commands.items():
            times[name].append(run_once(cmd, env))
    base = common.median(times["python -c 'import torch'"])
    rows = [[name, f"{common.median(v):.3f}", f"{min(v):.3f}-{max(v):.3f}",
             f"{common.median(v) - base:+.3f}"] for name, v in times.items()]
    print(common.table(["command", "seconds (median)", "range", "vs import torch"], rows))
    if args.importtime:
        for cli in (["--help"], ["plugins"]):
            print(f"slowest imports of `scoretk {' '.join(cli)}` (cumulative s; '·' marks "
                  "nesting):")
            for seconds, name in slowest_imports(env, 12, *cli):
                print(f"  {seconds:6.3f}  {name}")
    return times


if __name__ == "__main__":
    main()
