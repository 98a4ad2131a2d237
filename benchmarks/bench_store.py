"""HDF5 sample writing (scoretk.store.SampleStore): MB/s and peak memory for N small images.

Each N runs in a fresh subprocess that appends batches of random images the way
`scoretk sample` does (float batch -> uint8 NHWC, one journaled commit per batch, with its
fsyncs, into a file the process holds the run lock on) and reports its own peak RSS (VmHWM)
and the RSS right before the first write, so the growth with N shows whether writing holds
memory flat. `ms/append` is the whole cost of one batch's write, durability included.

    python benchmarks/bench_store.py                     # N = 1k, 10k, 100k; 3x16x16 images
    python benchmarks/bench_store.py --counts 1000,10000 --size 32
    python benchmarks/bench_store.py --no-fsync          # what the commits cost without fsync
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: I001  (puts the checkout on sys.path)


def _rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (Linux); -1 elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def child(n: int, size: int, channels: int, batch: int, path: str, seed: int,
          fsync: bool = True) -> dict:
    import torch

    from scoretk import journal
    from scoretk.store import SampleStore

    if not fsync:  # what durability costs: the same commits, without waiting for the disk
        class NoSync(journal.Disk):
            def sync(self, fd: int) -> None:
                pass

        journal.DISK = NoSync()

    g = torch.Generator().manual_seed(seed)
    item = (channels, size, size)
    store = SampleStore.create(path, item, {"num_samples": n, "seed": seed,
                                           "recipe": {"name": "bench_store"}})
    # one batch made up front and reused, so the timing is the writer's, not the RNG's
    data = torch.rand((batch, *item), generator=g)
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    written = 0
    while written < n:
        b = min(batch, n - written)
        written = store.append(data[:b], start=written)
    elapsed = time.perf_counter() - t0
    return {"n": n, "seconds": elapsed, "raw_mb": n * size * size * channels / 1e6,
            "file_mb": os.path.getsize(path) / 1e6, "rss_before_kib": before,
            "peak_rss_kib": _rss_kib("VmHWM"), "complete": SampleStore(path).complete}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="1000,10000,100000", help="numbers of images N")
    p.add_argument("--size", type=int, default=16, help="image size in px (default 16)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=500, help="images per append (a sampling batch)")
    p.add_argument("--repeats", type=int, default=1, help="runs per N (median shown)")
    p.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fsync", action="store_true",
                   help="commit without fsync (safe against a killed process, not power loss)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.size, args.channels, args.batch, args.out,
                               args.seed, fsync=not args.no_fsync)))
        return []

    import h5py
    import torch

    common.header("HDF5 sample writing (scoretk.store)", torch.device("cpu"),
                  image=f"{args.channels}x{args.size}x{args.size} uint8",
                  batch=args.batch, repeats=args.repeats, hdf5=h5py.version.hdf5_version,
                  fsync="off" if args.no_fsync else "on",
                  data="uniform random pixels (incompressible: the worst case for gzip)")
    counts = [int(float(c)) for c in args.counts.split(",") if c.strip()]
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in counts:
            runs = []
            for r in range(args.repeats):
                path = str(Path(tmp) / f"bench_{n}_{r}.h5")
                cmd = [sys.executable, __file__, "--child", str(n), "--out", path,
                       "--size", str(args.size), "--channels", str(args.channels),
                       "--batch", str(args.batch), "--seed", str(args.seed)]
                cmd += ["--no-fsync"] if args.no_fsync else []
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    sys.exit(f"bench_store: child for N={n} failed:\n{out.stderr[-2000:]}")
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                Path(path).unlink(missing_ok=True)
            runs.sort(key=lambda d: d["seconds"])
            results.append(runs[len(runs) // 2])
    rows = []
    for d in results:
        growth = (d["peak_rss_kib"] - d["rss_before_kib"]) / 1024
        appends = -(-d["n"] // args.batch)
        rows.append([f"{d['n']:,}", f"{d['raw_mb']:.1f}", f"{d['file_mb']:.1f}",
                     f"{d['seconds']:.2f}", f"{d['raw_mb'] / d['seconds']:.1f}",
                     f"{d['n'] / d['seconds']:,.0f}", f"{1000 * d['seconds'] / appends:.1f}",
                     f"{d['peak_rss_kib'] / 1024:.0f}", f"{growth:+.1f}",
                     "yes" if d["complete"] else "NO"])
    print(common.table(["N", "raw MB", "file MB", "seconds", "MB/s (raw)", "images/s",
                        "ms/append", "peak RSS MiB", "RSS growth while writing MiB",
                        "complete"], rows))
    print("note: peak RSS includes the interpreter, torch and h5py (the 'before' level); "
          "memory flat in N means the growth column does not grow with N")
    return results


if __name__ == "__main__":
    main()
