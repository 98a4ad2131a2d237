"""Where a training step (or a sampling batch) spends its time: torch.profiler's operator table
for scoretk and, with --reference DIR, for the public NCSNv2 code, at the same settings.

    python benchmarks/profile_step.py --device cuda --ngf 128 --batch 128 --reference DIR
    python benchmarks/profile_step.py --what sample --device cuda --ngf 128 --batch 128

Profile before optimising: the tables say which kernels to attack. On CUDA the
sort key is time on the device; on the CPU it is self CPU time. --trace FILE also writes a
Chrome trace (chrome://tracing, Perfetto) of the last profiled side.

On CPU, scoretk's batch is not split across threads here (the `unsplit` option): the profiler
records the calling thread's operators only, and the split changes when operators run, not
what they cost.
"""
from __future__ import annotations

import argparse

import common  # noqa: I001  (puts the checkout on sys.path)
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import bench_sample
import bench_train


def profiled(name: str, fn, device: torch.device, rows: int, calls: int,
             per_call: int, trace: str | None) -> float:
    """Profile `calls` calls of fn; print the operator table; return ms per step/evaluation."""
    for _ in range(2):  # warm-up: cuDNN autotuning, allocator, lazy init
        fn()
    common.sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        common.sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    # on CUDA, count the kernels only: an operator's row repeats its kernels' device time
    total = sum(getattr(e, key) for e in events
                if not cuda or e.device_type == DeviceType.CUDA) / 1e3 / (calls * per_call)
    print(f"\n== {name}: {total:.1f} ms of {'kernel' if cuda else 'self CPU'} "
          f"time per {'step' if per_call == 1 else 'net evaluation'}")
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    if trace:
        prof.export_chrome_trace(trace)
    return total


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, ngf=32, size=32, batch=32, repeats=1)
    p.add_argument("--what", choices=["train", "sample"], default="train")
    p.add_argument("--options", default="eager", help="one configuration, as in the benchmarks "
                                                      "(eager, channels_last, bf16, ...)")
    p.add_argument("--calls", type=int, default=3, help="profiled steps or sampling batches")
    p.add_argument("--rows", type=int, default=25, help="operators shown per table")
    p.add_argument("--reference", default=None, metavar="DIR")
    p.add_argument("--trace", default=None, metavar="FILE", help="Chrome trace of the last side")
    args = p.parse_args(argv)
    device = common.setup(args)
    train = args.what == "train"
    bench = bench_train if train else bench_sample
    # the benchmark scripts' defaults for what this script does not ask (train: CIFAR-10's
    # 232 levels, one step per call; sample: 5 levels x 2 Langevin steps, CIFAR-10's eps)
    settings = argparse.Namespace(**vars(args), sigma_max=50.0, sigma_min=0.01, eps=6.2e-6,
                                  levels=232 if train else 5, steps=1 if train else 2)
    common.header(f"profile of one {args.what} {'step' if train else 'batch'}", device,
                  ngf=args.ngf, size=args.size, batch=args.batch, options=args.options)
    ref = common.load_reference(args.reference)
    reg = common.registry()
    combo = args.options if device.type != "cpu" else "+".join(
        dict.fromkeys([*args.options.split("+"), "unsplit"]))
    sides = {f"scoretk {args.options}": lambda: bench.ours(settings, reg, device, combo)}
    if ref is not None:
        sides[common.REFERENCE] = lambda: bench.reference(settings, ref, device)
    totals = {}
    for name, build in sides.items():
        # bench_train's closures return (fn, parameters); bench_sample's (fn, evals, parameters)
        fn, *rest = build()
        totals[name] = profiled(name, fn, device, args.rows, args.calls,
                                1 if train else rest[0], args.trace)
    return totals

if __name__ == "__main__":
    main()
