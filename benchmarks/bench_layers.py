"""Ablation of the NCSNv2 layer optimisations: the net's forward (no grad: what sampling runs)
and forward+backward (what training runs), with everything on, and with each change switched
back to its plain form in turn. The "gain" column is time(without it) / time(all on).

    python benchmarks/bench_layers.py                  # ngf 32, 32 px, batch 32, CPU
    python benchmarks/bench_layers.py --threads 1      # steadier on a shared machine
    python benchmarks/bench_layers.py --device cuda --ngf 128 --batch 128 [--nchw]

The plain forms are the formulas the fast paths replace (same values to float rounding).
"""
from __future__ import annotations

import argparse
import contextlib

import common  # noqa: I001  (puts the checkout on sys.path)
import torch
import torch.nn.functional as F

from scoretk.execution.layout import in_preferred_layout
from scoretk_plugins.nets import layers, ops, refinenet


def _plain_msf(self, xs, size, level=None):
    return sum(F.interpolate(conv(norm(x, level)), size=size, mode="bilinear",
                             align_corners=True)
               for x, norm, conv in zip(xs, self.norms, self.convs))


def _unfused_norm_act(norm, act, x, level):
    return act(norm(x, level))


CHANGES = {
    # name: (description, patches as (object, attribute, plain replacement))
    "fused InstanceNorm++": (
        "var/mean once, scale+shift in one pass, hand-written backward",
        [(layers, "instance_norm_pp", ops._plain_norm)]),
    "InstanceNorm++ and ELU as one op": (
        "ELU in place on the norm's output, one backward for the pair",
        [(layers, "norm_act", _unfused_norm_act), (refinenet, "norm_act", _unfused_norm_act)]),
    "fast ELU": (
        "one autograd op: exp forward, backward from the saved output (no exp)",
        [(layers.ELU, "forward", lambda self, x: F.elu(x, self.alpha))]),
    "ELU forward via exp": (
        "just the forward part: max(exp(min(x,0)) - 1, x) instead of expm1",
        [(ops, "_elu_via_exp", lambda x: F.elu(x))]),
    "stride-2 ConvMeanPool": (
        "conv + 2x2 mean pool as one stride-2 conv",
        [(layers.ConvMeanPool, "forward", lambda self, x: F.avg_pool2d(self.conv(x), 2))]),
    "MSF: no same-size resize": (
        "skip identity bilinear resizes, sum in place",
        [(layers.MSF, "forward", _plain_msf)]),
    "CRP pooling paths": (
        "separable max (no grad; CUDA channels_last: also with grad); CPU: NCHW detour",
        [(layers, "pool5x5", ops.pool5x5_plain)]),
    "upsampling via channels_last": (
        "CUDA, NCHW only: bilinear upsampling in its channels_last kernel",
        [(layers, "upsample_bilinear", ops.upsample_bilinear_plain)]),
    "dilated weight gradient by taps": (
        "CPU channels_last: 9 matrix products instead of oneDNN's im2col + GEMM",
        [(layers.DilatedConv3x3, "forward",
          lambda self, x: F.conv2d(x, self.weight, self.bias, padding=self.padding,
                                   dilation=self.dilation))]),
    "channels_last inside": (
        "the net runs channels_last on CPU and CUDA (the execution policy's layout)",
        [("net", "prefers_channels_last", False)]),
}


@contextlib.contextmanager
def patched(net, patches):
    saved = []
    for obj, attr, value in patches:
        target = net if obj == "net" else obj
        saved.append((target, attr, getattr(target, attr)))
        setattr(target, attr, value)
    try:
        yield
    finally:
        for target, attr, value in reversed(saved):
            setattr(target, attr, value)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, ngf=32, size=32, batch=32, repeats=5)
    p.add_argument("--nchw", action="store_true",
                   help="run every configuration with the net in NCHW (shows the NCHW-only "
                        "paths, e.g. CRP's channels_last pooling detour)")
    args = p.parse_args(argv)
    device = common.setup(args)
    common.header("NCSNv2 layer optimisations, one at a time switched off", device,
                  ngf=args.ngf, size=args.size, batch=args.batch, repeats=args.repeats,
                  layout="NCHW (--nchw)" if args.nchw else "default")
    reg = common.registry()
    net = common.build_ncsnv2(reg, args.ngf, args.size, args.channels, 10, device)
    changes = dict(CHANGES)
    if args.nchw:
        net.prefers_channels_last = False
        del changes["channels_last inside"]
    x = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
    sigma = torch.rand(args.batch, device=device) + 0.5
    level = torch.zeros(args.batch, dtype=torch.long, device=device)
    grad = torch.randn_like(x)

    def forward():  # the layout wrapper is made per call: the ablation switches it off
        with torch.no_grad():
            in_preferred_layout(net, device)(x, sigma, level)

    def train():
        net.zero_grad(set_to_none=True)
        in_preferred_layout(net, device)(x, sigma, level).backward(grad)

    configs = {"all on": []} | {f"without {k}": v[1] for k, v in changes.items()}
    fns = {}
    for name, patches in configs.items():
        for kind, fn in (("fwd", forward), ("fwd+bwd", train)):
            fns[(name, kind)] = (lambda fn=fn, patches=patches: _run_patched(net, patches, fn))
    times = common.interleaved(fns, args.repeats, device, warmup=1)
    med = {k: common.median(v) for k, v in times.items()}
    rows = []
    for name in configs:
        f, t = med[(name, "fwd")], med[(name, "fwd+bwd")]
        gain = lambda kind: med[(name, kind)] / med[("all on", kind)]  # noqa: E731
        desc = CHANGES[name.removeprefix("without ")][0] if name != "all on" else ""
        rows.append([name, f"{f * 1e3:.0f}", f"{gain('fwd'):.2f}x" if name != "all on" else "-",
                     f"{t * 1e3:.0f}", f"{gain('fwd+bwd'):.2f}x" if name != "all on" else "-",
                     desc])
    print(common.table(["configuration", "fwd ms", "its fwd gain", "fwd+bwd ms",
                        "its fwd+bwd gain", "change"], rows))
    return med


def _run_patched(net, patches, fn):
    with patched(net, patches):
        fn()


if __name__ == "__main__":
    main()
