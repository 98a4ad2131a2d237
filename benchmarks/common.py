"""Shared helpers for the benchmark scripts: environment header, timing, model building, and
the optional NCSNv2 reference (public ermongroup/ncsnv2 code, never shipped with scoretk).

Benchmarks print tables; nothing here asserts a speed. Timings on a shared machine are noisy:
every script takes the median of several repeats and interleaves the configurations it
compares (A B C A B C ...), so a burst of load hits all of them alike.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


# ---------------------------------------------------------------------------- arguments

def add_common_args(p: argparse.ArgumentParser, *, ngf: int, size: int, batch: int,
                    repeats: int) -> None:
    p.add_argument("--ngf", type=int, default=ngf, help="NCSNv2 base width (default %(default)s)")
    p.add_argument("--size", type=int, default=size, help="image size in px (default %(default)s)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=batch, help="batch size (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--repeats", type=int, default=repeats,
                   help="timed repeats per configuration; the table shows their median")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone; by default a CPU run keeps "
                        "freed memory as `scoretk train` and `scoretk sample` do (for the "
                        "whole process: the reference too)")


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark: --device cuda but torch sees no CUDA device")
    global _MALLOC
    if device.type == "cpu":
        from scoretk.execution.cpu_memory import keep_freed_memory
        kept = not args.system_malloc and keep_freed_memory()
        _MALLOC = "freed memory kept (as scoretk train)" if kept else "system settings"
    return device


_MALLOC = None  # what setup() did to glibc's malloc, for the header


def header(title: str, device: torch.device, **settings) -> None:
    """The conditions every table needs next to it."""
    if device.type == "cuda":
        dev = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        dev = f"cpu ({_cpu_name()}, {os.cpu_count()} logical cores, " \
              f"ISA {torch.backends.cpu.get_cpu_capability()})"
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    print(f"== {title}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')} | host: "
          f"{platform.node()} | python {platform.python_version()}")
    print(f"device: {dev} | torch {torch.__version__} | threads: {torch.get_num_threads()} | "
          f"load average (1/5/15 min) at start: {load}"
          + (f" | malloc: {_MALLOC}" if _MALLOC else ""))
    if settings:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured round-robin: A B C A B C ... (after warm-up)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


REFERENCE = "reference (ermongroup/ncsnv2)"


def compare(fns: dict[str, Callable[[], None]], work: dict[str, float], units: dict[str, int],
            device: torch.device, repeats: int, *, rate: str, per_unit: str, digits: int,
            notes: list[str]) -> dict:
    """Warm up, time `fns` interleaved, print the table and the notes.

    work[name]: items one call processes (the rate is work / median seconds); units[name]:
    how many steps or evaluations one call makes (for the per-unit milliseconds). Each rate
    is also given as a ratio to "scoretk eager" and to the reference, where they ran.

    "paired vs reference" is the median over repeats of the ratio within each repeat (round
    A B C). On a shared machine, where the load moves from second to second, it is steadier
    than the ratio of medians; many short repeats (e.g. --steps 1 --repeats 30) suit it best.
    """
    for name, fn in fns.items():  # warm-up; compiled configurations compile here
        t0 = time.perf_counter()
        fn()
        sync(device)
        if "compile" in name:
            notes.append(f"{name}: first call (compilation included) took "
                         f"{time.perf_counter() - t0:.0f} s")
    times = interleaved(fns, repeats, device, warmup=0)
    rates = {k: work[k] / median(v) for k, v in times.items()}
    ref, eager = rates.get(REFERENCE), rates.get("scoretk eager")
    paired = {k: median([(work[k] / t) / (work[REFERENCE] / r)
                         for t, r in zip(v, times[REFERENCE])])
              for k, v in times.items()} if ref else {}
    rows = []
    for k, v in times.items():
        lo, hi = (work[k] / t for t in (max(v), min(v)))
        rows.append([k, f"{rates[k]:.{digits}f}", f"{lo:.{digits}f}-{hi:.{digits}f}",
                     f"{median(v) / units[k] * 1e3:.0f}",
                     f"{rates[k] / eager:.2f}x" if eager else "-",
                     f"{rates[k] / ref:.2f}x" if ref else "-",
                     f"{paired[k]:.2f}x" if ref else "-"])
    print(table(["configuration", f"{rate} (median)", "range", per_unit, "vs scoretk eager",
                 "vs reference", "paired vs reference"], rows))
    for n in notes:
        print("note: " + n)
    return {"rate": rates, "times": times, "paired": paired}


def check_parameters(n_params: dict[str, int], notes: list[str]) -> None:
    """Print both parameter counts; a mismatch means the two nets are not the same."""
    if "scoretk" in n_params and "reference" in n_params \
            and n_params["reference"] != n_params["scoretk"]:
        notes.append(f"WARNING: parameter counts differ: scoretk {n_params['scoretk']:,}, "
                     f"reference {n_params['reference']:,}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in n_params.items()))


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (pastes straight into benchmarks/README.md)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows)])


# ---------------------------------------------------------------------------- scoretk parts

def registry():
    from scoretk.plugins import load_plugins
    return load_plugins().registry


def build_ncsnv2(reg, ngf: int, size: int, channels: int, num_levels: int,
                 device: torch.device) -> torch.nn.Module:
    net = reg.build("net", {"kind": "ncsnv2", "ngf": ngf}, shape=(channels, size, size),
                    num_levels=num_levels)
    return net.to(device)


def bench_recipe(args, reg, opts: set[str]):
    """A recipe for the benchmarked NCSNv2 (its data are never loaded: the benchmarks feed
    random tensors), with the speed options as the recipe's own train settings."""
    from scoretk.recipe import Recipe

    return Recipe.from_dict({
        "name": "bench",
        "data": {"kind": "image_folder", "root": "unused", "image_size": args.size,
                 "channels": args.channels},
        "schedule": {"kind": "geometric", "sigma_max": args.sigma_max,
                     "sigma_min": args.sigma_min, "num_levels": args.levels},
        "net": {"kind": "ncsnv2", "ngf": args.ngf},
        "loss": {"kind": "dsm"},
        "sampler": {"kind": "annealed_langevin", "steps_per_level": getattr(args, "steps", 1),
                    "eps": getattr(args, "eps", 1e-6), "denoise": True},
        "averager": {"kind": "ema", "rate": 0.999},
        "optim": {"lr": 1e-4},
        "train": {"iterations": 1, "batch_size": args.batch, "seed": args.seed,
                  "device": args.device.split(":")[0], "channels_last": "channels_last" in opts,
                  "compile": "compile" in opts, "bf16": "bf16" in opts,
                  "batch_threads": 1 if "unsplit" in opts else "auto"},
    }, reg, source="benchmark")


def bench_policy(recipe, opts: set[str]):
    """The execution policy `scoretk train` would use for the recipe; 'nchw' runs the net in
    its input's NCHW layout instead of the channels_last it prefers on CPU and CUDA."""
    from scoretk.execution.policy import ExecutionPolicy

    policy = ExecutionPolicy.for_training(recipe.train)
    return policy.replace(layout="input") if "nchw" in opts else policy


# ---------------------------------------------------------------------------- the reference

class Reference:
    """The public NCSNv2 code (ermongroup/ncsnv2 layout: models/ncsnv2.py, models/__init__.py,
    models/ema.py, losses/dsm.py), imported from a directory given on the command line.

    scoretk does not ship it; benchmarks use it only to measure the ratio on this machine.
    """

    def __init__(self, path: str):
        path = str(Path(path).resolve())
        if not Path(path, "models", "ncsnv2.py").is_file():
            raise FileNotFoundError(f"{path}/models/ncsnv2.py not found")
        sys.path.insert(0, path)
        try:
            import models as ref_models  # noqa: F401  (the reference's package names)
            from losses.dsm import anneal_dsm_score_estimation
            from models import anneal_Langevin_dynamics
            from models.ema import EMAHelper
            from models.ncsnv2 import NCSNv2, NCSNv2Deeper, NCSNv2Deepest
        finally:
            sys.path.remove(path)
        self.path = path
        self.NCSNv2, self.EMAHelper = NCSNv2, EMAHelper
        self.NCSNv2Deeper, self.NCSNv2Deepest = NCSNv2Deeper, NCSNv2Deepest
        self.dsm, self.langevin = anneal_dsm_score_estimation, anneal_Langevin_dynamics

    def config(self, ngf: int, size: int, channels: int, sigma_max: float, sigma_min: float,
               num_levels: int, device: torch.device) -> SimpleNamespace:
        ns = SimpleNamespace
        return ns(device=device,
                  data=ns(logit_transform=False, rescaled=False, channels=channels,
                          image_size=size),
                  model=ns(ngf=ngf, num_classes=num_levels, sigma_begin=sigma_max,
                           sigma_end=sigma_min, sigma_dist="geometric", ema=True,
                           ema_rate=0.999, normalization="InstanceNorm++", nonlinearity="elu"))

    def net(self, config) -> torch.nn.Module:
        return self.NCSNv2(config).to(config.device)


def load_reference(path: str | None) -> Reference | None:
    """The reference, or None with the reason printed ("reference: not available")."""
    if not path:
        print("reference: not available (pass --reference DIR with the public ermongroup/ncsnv2 "
              "code to measure the ratio)")
        return None
    try:
        ref = Reference(path)
    except Exception as exc:  # noqa: BLE001 - any failure just means no reference row
        print(f"reference: not available ({type(exc).__name__}: {exc})")
        return None
    print(f"reference: {ref.path}")
    return ref


# ---------------------------------------------------------------------------- speed options

OPTION_HELP = ("comma-separated configurations to time, each '+'-joined speed options: eager "
               "(the default net; on CPU the batch is split across torch's threads), unsplit "
               "(on CPU, the whole batch through each op on all threads), nchw (force the "
               "net's internal layout to the input's NCHW; by default it runs channels_last "
               "on CPU and CUDA), channels_last (weights and "
               "input channels_last too), compile (torch.compile), bf16 (autocast, CUDA "
               "only){extra}; 'all' for every one that applies. Default: %(default)s")


def parse_options(spec: str, device: torch.device, extra: tuple[str, ...] = ()) -> list[str]:
    """Configurations like 'eager', 'channels_last', 'compile+channels_last', in table order."""
    known = {"eager", "unsplit", "nchw", "channels_last", "compile", "bf16", *extra}
    if spec == "all":
        if device.type == "cuda":
            return ["eager", "nchw", "channels_last", "compile", "compile+channels_last",
                    "bf16", "bf16+channels_last", *extra]
        return ["eager", "unsplit", "nchw", "channels_last", "compile", "compile+channels_last"]
    out = []
    for combo in (s.strip() for s in spec.split(",") if s.strip()):
        parts = set(combo.split("+"))
        if parts - known:
            sys.exit(f"benchmark: unknown option(s) {sorted(parts - known)} in --options; "
                     f"known: {sorted(known)}")
        out.append(combo)
    return out


def skip_reason(combo: str, device: torch.device) -> str | None:
    parts = set(combo.split("+"))
    if device.type != "cuda" and parts & {"bf16", "cuda_graphs"}:
        return "needs a CUDA device (bf16 autocast and CUDA graphs are GPU options here)"
    if device.type != "cpu" and "unsplit" in parts:
        return "batches are split across threads on CPU only"
    return None
