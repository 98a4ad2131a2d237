"""Training-step throughput (images/s) of NCSNv2: one step = DSM loss, backward, Adam, EMA,
as scoretk.train runs it (gradient norm and finiteness check included), per speed option;
optionally the same for the public NCSNv2 code (--reference DIR).

    python benchmarks/bench_train.py                       # ngf 32, 32 px, batch 32, CPU
    python benchmarks/bench_train.py --options all --reference /tmp/ncsnv2_ref
"""
from __future__ import annotations

import argparse
import math
import time
from contextlib import nullcontext

import common  # noqa: I001  (puts the checkout on sys.path)
import torch
from torch import nn

from scoretk.rng import derive_seed, generator


def ours(args, reg, device: torch.device, combo: str):
    """A closure running `args.steps` scoretk training steps with the options in `combo`."""
    opts = set(combo.split("+"))
    torch.manual_seed(args.seed)
    net = common.build_ncsnv2(reg, args.ngf, args.size, args.channels, args.levels, device)
    net = common.apply_layout(net, opts)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                 **({"fused": True} if "fused_adam" in opts else {}))
    averager = reg.build("averager", {"kind": "ema", "rate": 0.999}, model=net)
    loss_fn = reg.build("loss", {"kind": "dsm"})
    schedule = common.build_schedule(reg, args.sigma_max, args.sigma_min, args.levels)
    schedule.sigmas = schedule.sigmas.to(device)
    train_net = torch.compile(net) if "compile" in opts else net
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if "bf16" in opts \
        else nullcontext
    x = common.layout_input(torch.rand(args.batch, args.channels, args.size, args.size,
                                       device=device), opts)
    params = [p for p in net.parameters() if p.requires_grad]
    state = {"step": 0, "first_bad": torch.full((), -1, dtype=torch.long, device=device)}

    def run() -> None:
        for _ in range(args.steps):
            step = state["step"]
            g = generator(derive_seed(args.seed, "step", step, 0), device)
            with autocast():
                loss, _stats = loss_fn(train_net, x, schedule, g)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if "norm_only" in opts:  # no clipping configured: measure the norm, skip the x1.0
                grad_norm = nn.utils.get_total_norm([p.grad for p in params])
            else:  # what scoretk.train does today
                grad_norm = nn.utils.clip_grad_norm_(params, math.inf)
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            bad = state["first_bad"]
            state["first_bad"] = torch.where((bad < 0) & ~finite,
                                             torch.full_like(bad, step + 1), bad)
            optimiser.step()
            averager.update(net)
            state["step"] = step + 1

    return run, common.count_parameters(net)


def reference(args, ref: common.Reference, device: torch.device):
    """The reference runner's inner loop (runners/ncsn_runner.py: train), minus its logging
    (tensorboard, logging.info): DSM loss, loss.item(), Adam, EMAHelper.update."""
    torch.manual_seed(args.seed)
    config = ref.config(args.ngf, args.size, args.channels, args.sigma_max, args.sigma_min,
                        args.levels, device)
    score = nn.DataParallel(ref.net(config))  # as the runner wraps it (a pass-through here)
    optimiser = torch.optim.Adam(score.parameters(), lr=1e-4, weight_decay=0.,
                                 betas=(0.9, 0.999), amsgrad=False, eps=1e-8)
    ema = ref.EMAHelper(mu=0.999)
    ema.register(score)
    sigmas = score.module.sigmas
    X = torch.rand(args.batch, args.channels, args.size, args.size, device=device)

    def run() -> None:
        for _ in range(args.steps):
            loss = ref.dsm(score, X, sigmas, None, 2.0, None)
            loss.item()  # the runner logs it every step
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            ema.update(score)

    return run, common.count_parameters(score)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, ngf=32, size=32, batch=32, repeats=5)
    p.add_argument("--steps", type=int, default=2, help="training steps per timed repeat")
    p.add_argument("--levels", type=int, default=232, help="noise levels L (CIFAR-10: 232)")
    p.add_argument("--sigma-max", type=float, default=50.0)
    p.add_argument("--sigma-min", type=float, default=0.01)
    p.add_argument("--options", default="eager,nchw,channels_last",
                   help=common.OPTION_HELP.format(
                       extra=", fused_adam (Adam(fused=True)), norm_only (gradient norm without "
                             "the no-op clipping multiply): proposals for scoretk.train"))
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="directory with the public ermongroup/ncsnv2 code (models/, losses/)")
    args = p.parse_args(argv)
    device = common.setup(args)
    combos = common.parse_options(args.options, device, ("fused_adam", "norm_only"))
    if args.options == "all":
        combos.insert(1, "fused_adam+norm_only")
    common.header("training step throughput (images/s)", device, ngf=args.ngf,
                  size=args.size, channels=args.channels, batch=args.batch, levels=args.levels,
                  steps_per_repeat=args.steps, repeats=args.repeats)
    ref = common.load_reference(args.reference)
    reg = common.registry()

    fns, notes, n_params = {}, [], {}
    for combo in combos:
        why = common.skip_reason(combo, device)
        if why:
            notes.append(f"{combo}: skipped, {why}")
            continue
        fns[f"scoretk {combo}"], n_params["scoretk"] = ours(args, reg, device, combo)
    if ref is not None:
        fns["reference (ermongroup/ncsnv2)"], n_params["reference"] = reference(args, ref, device)
        if n_params.get("scoretk") is not None and n_params["reference"] != n_params["scoretk"]:
            notes.append(f"WARNING: parameter counts differ: scoretk {n_params['scoretk']:,}, "
                         f"reference {n_params['reference']:,}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in n_params.items()))

    # warm-up (compiles the compiled configurations; timed separately)
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        if "compile" in name:
            notes.append(f"{name}: first call (compilation + {args.steps} steps) took "
                         f"{time.perf_counter() - t0:.0f} s")
    times = common.interleaved(fns, args.repeats, device, warmup=0)
    rate = {k: args.steps * args.batch / common.median(v) for k, v in times.items()}
    ref_rate = rate.get("reference (ermongroup/ncsnv2)")
    eager = rate.get("scoretk eager")
    rows = []
    for k, v in times.items():
        lo, hi = (args.steps * args.batch / t for t in (max(v), min(v)))
        rows.append([k, f"{rate[k]:.2f}", f"{lo:.2f}-{hi:.2f}", f"{common.median(v) / args.steps * 1e3:.0f}",
                     f"{rate[k] / eager:.2f}x" if eager else "-",
                     f"{rate[k] / ref_rate:.2f}x" if ref_rate else "-"])
    print(common.table(["configuration", "images/s (median)", "range", "ms/step",
                        "vs scoretk eager", "vs reference"], rows))
    for n in notes:
        print("note: " + n)
    return {"rate": rate, "times": times}


if __name__ == "__main__":
    main()
