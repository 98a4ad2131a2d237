"""Training-step throughput (images/s) of NCSNv2: one step = DSM loss, backward, gradient
norm, finiteness check, Adam, EMA; scoretk's side is built by scoretk.training.builder, as
`scoretk train` builds it. Per
speed option; optionally the same for the public NCSNv2 code (--reference DIR).

    python benchmarks/bench_train.py                       # ngf 32, 32 px, batch 32, CPU
    python benchmarks/bench_train.py --options all --reference /tmp/ncsnv2_ref
"""
from __future__ import annotations

import argparse

import common  # noqa: I001  (puts the checkout on sys.path)
import torch
from torch import nn

from scoretk.assemble import count_parameters
from scoretk.rng import derive_seed, generator
from scoretk.training.builder import build_trainer


def ours(args, reg, device: torch.device, combo: str):
    """A closure running `args.steps` training steps as `scoretk train` builds them
    (scoretk.training.builder: the recipe's settings through the execution policy), with the
    options in `combo` as the recipe's train settings."""
    opts = set(combo.split("+"))
    recipe = common.bench_recipe(args, reg, opts)
    policy = common.bench_policy(recipe, opts)
    shape = (args.channels, args.size, args.size)
    trainer = build_trainer(recipe, reg, shape, policy)
    x = policy.as_input(torch.rand(args.batch, *shape, device=device))
    state = {"step": 0}

    def run() -> None:
        for _ in range(args.steps):
            step = state["step"]
            trainer.step(x, generator(derive_seed(args.seed, "step", step, 0), device), step)
            state["step"] = step + 1

    return run, count_parameters(trainer.net)


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

    return run, count_parameters(score)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, ngf=32, size=32, batch=32, repeats=5)
    p.add_argument("--steps", type=int, default=2, help="training steps per timed repeat")
    p.add_argument("--levels", type=int, default=232, help="noise levels L (CIFAR-10: 232)")
    p.add_argument("--sigma-max", type=float, default=50.0)
    p.add_argument("--sigma-min", type=float, default=0.01)
    p.add_argument("--options", default="eager,unsplit,nchw,channels_last",
                   help=common.OPTION_HELP.format(extra=""))
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="directory with the public ermongroup/ncsnv2 code (models/, losses/)")
    args = p.parse_args(argv)
    device = common.setup(args)
    combos = common.parse_options(args.options, device)
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
        fns[common.REFERENCE], n_params["reference"] = reference(args, ref, device)
    common.check_parameters(n_params, notes)
    work = {k: args.steps * args.batch for k in fns}
    return common.compare(fns, work, {k: args.steps for k in fns}, device, args.repeats,
                          rate="images/s", per_unit="ms/step", digits=2, notes=notes)


if __name__ == "__main__":
    main()
