"""Run every benchmark with small defaults (a few minutes on 2 CPU cores): `make bench`.

Each script runs in its own process, so one's threads, caches and compiled code do not
colour the next. Pass --full for the settings of the tables in benchmarks/README.md
(NCSNv2 ngf 32, 32 px, batch 32; with --device cuda, ngf 128 and batch 128, every speed
option) and --reference DIR to add the public NCSNv2 code's rows.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SMALL = {
    "bench_train.py": ["--ngf", "16", "--size", "16", "--batch", "16", "--levels", "10",
                       "--repeats", "3"],
    "bench_sample.py": ["--ngf", "16", "--size", "16", "--batch", "16", "--levels", "3",
                        "--steps", "2", "--repeats", "3"],
    "bench_store.py": ["--counts", "1000,10000,100000"],
    "bench_startup.py": ["--repeats", "5"],
    "bench_features.py": ["--batch", "10", "--repeats", "2", "--metrics-n", "1000"],
}
FULL = {
    "bench_train.py": ["--repeats", "5"],
    "bench_sample.py": ["--repeats", "3"],
    "bench_store.py": ["--counts", "1000,10000,100000"],
    "bench_startup.py": ["--repeats", "5"],
    "bench_features.py": ["--repeats", "3", "--metrics-n", "10000"],
}
GPU = {  # --full --device cuda: the GPU tables' setting, NCSNv2 ngf 128, 32 px, batch 128
    "bench_train.py": ["--ngf", "128", "--batch", "128", "--steps", "10", "--repeats", "5",
                       "--options", "all"],
    "bench_sample.py": ["--ngf", "128", "--batch", "128", "--levels", "10", "--steps", "5",
                        "--repeats", "5", "--options", "all"],
    "bench_store.py": FULL["bench_store.py"],
    "bench_startup.py": FULL["bench_startup.py"],
    "bench_features.py": FULL["bench_features.py"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--full", action="store_true", help="the README's settings (slower)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="public ermongroup/ncsnv2 code, for the ratio rows")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--only", default=None, help="comma-separated script names to run")
    args = p.parse_args()
    plan = (GPU if (args.device or "").startswith("cuda") else FULL) if args.full else SMALL
    failed = []
    for script, extra in plan.items():
        if args.only and script.removesuffix(".py") not in args.only.replace(".py", "").split(","):
            continue
        cmd = [sys.executable, str(HERE / script), *extra]
        if args.reference and script in ("bench_train.py", "bench_sample.py"):
            cmd += ["--reference", args.reference]
        if args.device and script in ("bench_train.py", "bench_sample.py", "bench_features.py"):
            cmd += ["--device", args.device]
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        print(f"({script}: {time.perf_counter() - t0:.0f} s)", flush=True)
        if rc:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
