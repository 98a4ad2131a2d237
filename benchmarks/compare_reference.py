"""Same function as the public NCSN/NCSNv2 code? Builds each released net (NCSNv2,
NCSNv2Deeper, NCSNv2Deepest from --reference, NCSN v1's CondRefineNetDilated from
--reference-v1) with random weights, its norm parameters perturbed so they matter, copies the
weights into scoretk's net through `scoretk import`'s name map and checks, and prints the
relative L2 difference of the two outputs on the same inputs, in float32 and float64.

    python benchmarks/compare_reference.py --reference /path/to/ncsnv2 --reference-v1 /path/to/ncsn

Neither reference is shipped with scoretk (see README.md, "The reference").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import common  # noqa: I001  (puts the checkout on sys.path)
import torch
from torch import nn

from scoretk.interop.reference import CLASS_NAMES, ReleasedCheckpoint, convert_weights

V2_KINDS = {"ncsnv2": "NCSNv2", "ncsnv2_deeper": "NCSNv2Deeper",
            "ncsnv2_deepest": "NCSNv2Deepest"}


def load_v1(path: str):
    """CondRefineNetDilated from the public NCSN code. Both repositories name their package
    `models`, so the other one's modules step aside while this one imports."""
    path = str(Path(path).resolve())
    if not Path(path, "models", "cond_refinenet_dilated.py").is_file():
        raise FileNotFoundError(f"{path}/models/cond_refinenet_dilated.py not found")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules)
             if k == "models" or k.startswith("models.")}
    sys.path.insert(0, path)
    try:
        from models.cond_refinenet_dilated import CondRefineNetDilated
    finally:
        sys.path.remove(path)
        for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return CondRefineNetDilated


def v1_config(ngf: int, size: int, channels: int, num_levels: int) -> SimpleNamespace:
    ns = SimpleNamespace
    return ns(data=ns(channels=channels, image_size=size, logit_transform=False),
              model=ns(ngf=ngf, num_classes=num_levels))


def perturb_norms(net: nn.Module, generator: torch.Generator) -> None:
    """Released nets start with gamma, alpha ~ N(1, 0.02) and beta = 0, where the alpha term
    and the scale barely show; spread them out."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.rsplit(".", 1)[-1] in ("alpha", "gamma", "beta") or "embed" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=generator))


def compare(kind: str, ref_net: nn.Module, reg, ngf: int, size: int, channels: int,
            num_levels: int, batch: int, dtype: torch.dtype, seed: int) -> tuple[float, int, int]:
    """(relative L2 difference of the outputs, scoretk parameters, reference parameters)."""
    g = torch.Generator().manual_seed(seed)
    perturb_norms(ref_net, g)
    ref_state = ref_net.state_dict()
    net = reg.build("net", {"kind": kind, "ngf": ngf}, shape=(channels, size, size),
                    num_levels=num_levels)
    sigmas = ref_state.get("sigmas", torch.ones(num_levels))
    ckpt = ReleasedCheckpoint(Path("<reference net>"), ref_state, {})
    net.load_state_dict(convert_weights(ckpt, net, kind, sigmas))
    net, ref_net = net.to(dtype).eval(), ref_net.to(dtype).eval()
    x = torch.rand(batch, channels, size, size, generator=g).to(dtype)
    labels = torch.randint(0, num_levels, (batch,), generator=g)
    sigma = sigmas.to(dtype)[labels]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the reference's MSF block sums into a default-dtype zeros
    try:
        with torch.no_grad():
            ours, theirs = net(x, sigma, labels), ref_net(x, labels)
    finally:
        torch.set_default_dtype(default)
    err = float((ours.double() - theirs.double()).norm() / theirs.double().norm())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return err, count(net), count(ref_net)


def main(argv: list[str] | None = None) -> list[list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", metavar="DIR", help="the public ermongroup/ncsnv2 code")
    p.add_argument("--reference-v1", metavar="DIR", help="the public ermongroup/ncsn code")
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--levels", type=int, default=232, help="NCSNv2's L (v1 uses 10)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    common.header("scoretk's nets against the released code, weights copied", torch.device("cpu"),
                  ngf=args.ngf, channels=args.channels, batch=args.batch)
    ref = common.load_reference(args.reference)
    cases = []  # (kind, build the reference net, size, levels)
    if ref is not None:
        for kind, cls in V2_KINDS.items():
            size = 32 if kind == "ncsnv2" else 64
            config = ref.config(args.ngf, size, args.channels, 50.0, 0.01, args.levels, "cpu")
            cases.append((kind, lambda c=config, n=cls: getattr(ref, n)(c), size, args.levels))
    if args.reference_v1:
        v1 = load_v1(args.reference_v1)
        cases.append(("ncsn", lambda: v1(v1_config(args.ngf, 32, args.channels, 10)), 32, 10))
    reg, rows = common.registry(), []
    for kind, build, size, levels in cases:
        errs = {}
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(args.seed)
            errs[dtype], n_ours, n_ref = compare(kind, build(), reg, args.ngf, size,
                                                 args.channels, levels, args.batch, dtype,
                                                 args.seed)
        rows.append([kind, CLASS_NAMES[kind], f"{args.channels}x{size}x{size}, L {levels}",
                     f"{n_ours:,}" + ("" if n_ours == n_ref else f" (reference {n_ref:,})"),
                     f"{errs[torch.float32]:.1e}", f"{errs[torch.float64]:.1e}"])
    print(common.table(["scoretk net", "reference", "input", "parameters",
                        "rel. L2 difference, float32", "float64"], rows))
    return rows


if __name__ == "__main__":
    main()
