"""Sampling throughput of the annealed Langevin sampler with an NCSNv2 net, in
sample-evaluations/s = batch x network evaluations / seconds, per speed option; optionally the
same for the public NCSNv2 code (--reference DIR: its anneal_Langevin_dynamics, final_only).

    python benchmarks/bench_sample.py                       # ngf 32, 32 px, batch 32, CPU
    python benchmarks/bench_sample.py --options all --reference /tmp/ncsnv2_ref

scoretk's side is what `scoretk sample` runs per batch: the EMA weights swapped in, per-sample
seeded noise (scoretk.rng.PerSampleNoise), sampler.sample(...). A batch here runs L levels x T
steps (+1 denoising step); throughput does not depend on L, so a short schedule keeps it quick.
"""
from __future__ import annotations

import argparse

import common  # noqa: I001  (puts the checkout on sys.path)
import torch
from torch import nn

from scoretk import assemble
from scoretk.assemble import count_parameters
from scoretk.rng import PerSampleNoise


class CUDAGraphNet(nn.Module):
    """Replays one captured CUDA graph of net(x, sigma, level) for a fixed batch shape.

    Captured on the first call, i.e. inside the sampler (and inside the EMA's weight swap, so
    the graph reads the averaged weights: the swap exchanges the same two storages every
    batch). Inputs are copied into static buffers, so the sampler's loop runs unchanged; the
    output is a static buffer too (the sampler reads it before the next call)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.graph = net, None

    def _capture(self, x, sigma, level) -> None:
        self.x, self.sigma, self.level = x.clone(), sigma.clone(), level.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the graph (cuDNN autotuning, allocations)
                self.net(self.x, self.sigma, self.level)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.net(self.x, self.sigma, self.level)

    def forward(self, x, sigma, level):
        if self.graph is None:
            self._capture(x, sigma, level)
        self.x.copy_(x)
        self.sigma.copy_(sigma)
        self.level.copy_(level)
        self.graph.replay()
        return self.out


def ours(args, reg, device: torch.device, combo: str):
    """A closure sampling one batch as `scoretk sample` does: the execution policy places the
    net and splits its batches; `compile`, `cuda_graphs`, `bf16` and `inference_mode` are
    options only this benchmark has."""
    opts = set(combo.split("+"))
    recipe = common.bench_recipe(args, reg, opts)
    policy = common.bench_policy(recipe, opts)
    shape = (args.channels, args.size, args.size)
    torch.manual_seed(args.seed)
    model = assemble.build_model(recipe, reg, shape)
    net = policy.place(model.net, shape).eval()
    averager = assemble.build_averager(recipe, reg, net)
    schedule, sampler = model.schedule, model.sampler
    schedule.sigmas = schedule.sigmas.to(device)
    run_net = torch.compile(policy.in_layout(net)) if "compile" in opts \
        else policy.for_sampling_net(net)
    if "cuda_graphs" in opts:
        run_net = CUDAGraphNet(run_net)
    grad_mode = torch.inference_mode if "inference_mode" in opts else torch.no_grad
    batch_index = [0]

    def run() -> None:
        b = batch_index[0]
        batch_index[0] += 1
        noise = PerSampleNoise(args.seed, range(b * args.batch, (b + 1) * args.batch), device)
        with grad_mode(), averager.averaged(net), policy.autocast():
            x = sampler.sample(run_net, schedule, shape, noise, device=device)
        x.float().cpu()  # what the writer does with a finished batch

    return run, sampler.evaluations_per_sample(schedule), count_parameters(net)


def reference(args, ref: common.Reference, device: torch.device):
    """The reference's sampling path (runners/ncsn_runner.py: sample, fid branch):
    EMA weights copied into the model, uniform init, anneal_Langevin_dynamics(final_only)."""
    torch.manual_seed(args.seed)
    config = ref.config(args.ngf, args.size, args.channels, args.sigma_max, args.sigma_min,
                        args.levels, device)
    score = nn.DataParallel(ref.net(config))
    ema = ref.EMAHelper(mu=0.999)
    ema.register(score)
    ema.ema(score)
    score.eval()
    sigmas = score.module.sigmas.cpu().numpy()

    def run() -> None:
        init = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
        out = ref.langevin(init, score, sigmas, args.steps, args.eps, final_only=True,
                           verbose=False, denoise=True)
        out[-1].float()

    return run, args.levels * args.steps + 1, count_parameters(score)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, ngf=32, size=32, batch=32, repeats=3)
    p.add_argument("--levels", type=int, default=5, help="noise levels L per batch")
    p.add_argument("--steps", type=int, default=2, help="Langevin steps per level T")
    p.add_argument("--sigma-max", type=float, default=50.0)
    p.add_argument("--sigma-min", type=float, default=0.01)
    p.add_argument("--eps", type=float, default=6.2e-6, help="step size (CIFAR-10's)")
    p.add_argument("--options", default="eager,unsplit,nchw,channels_last",
                   help=common.OPTION_HELP.format(extra=", inference_mode, cuda_graphs "
                                                        "(CUDA only)"))
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="directory with the public ermongroup/ncsnv2 code (models/, losses/)")
    args = p.parse_args(argv)
    device = common.setup(args)
    extra = ("inference_mode", "cuda_graphs")
    combos = common.parse_options(args.options, device, extra)
    if args.options == "all":
        combos.insert(1, "inference_mode")
    common.header("sampling throughput (sample-evaluations/s = batch x net evaluations / s)",
                  device, ngf=args.ngf, size=args.size, channels=args.channels,
                  batch=args.batch, levels=args.levels, steps_per_level=args.steps,
                  repeats=args.repeats)
    ref = common.load_reference(args.reference)
    reg = common.registry()

    fns, evals, notes, n_params = {}, {}, [], {}
    for combo in combos:
        why = common.skip_reason(combo, device)
        if why:
            notes.append(f"{combo}: skipped, {why}")
            continue
        name = f"scoretk {combo}"
        fns[name], evals[name], n_params["scoretk"] = ours(args, reg, device, combo)
    if "cuda_graphs" not in " ".join(combos) and device.type != "cuda":
        notes.append("cuda_graphs: skipped, no GPU (CUDA graphs are a CUDA option)")
    if ref is not None:
        fns[common.REFERENCE], evals[common.REFERENCE], n_params["reference"] = \
            reference(args, ref, device)
    common.check_parameters(n_params, notes)
    print(f"network evaluations per batch: {args.levels} levels x {args.steps} steps + 1 "
          f"denoising = {args.levels * args.steps + 1}")
    return common.compare(fns, {k: args.batch * e for k, e in evals.items()}, evals, device,
                          args.repeats, rate="sample-evals/s", per_unit="ms/net eval",
                          digits=1, notes=notes)


if __name__ == "__main__":
    main()
