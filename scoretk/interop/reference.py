"""The checkpoints of the released NCSN and NCSNv2 code, and the names of their weights.

The public code saves a plain list with `torch.save`:
- NCSNv2 (NCSNv2, NCSNv2Deeper, NCSNv2Deepest): `[model, optimizer, epoch, step, ema]`, the
  last entry only with EMA on (as in every released config);
- NCSN v1 (CondRefineNetDilated): `[model, optimizer]`.
`model` is the state dict of the net wrapped in DataParallel (keys start with `module.`);
NCSNv2's also holds the buffer `sigmas`, the noise schedule. `ema` maps the unwrapped net's
parameter names to their averages. `optimizer` is Adam's state dict, its parameter ids in the
order of the net's parameters, which is the order of the parameter keys in `model`.

The nets are the same functions as scoretk's `ncsn*` RefineNets, module for module; only the
names differ. `name_map` derives the correspondence from the structure of a scoretk net, so it
follows the net's width and depth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from torch import Tensor, nn

from scoretk.checkpoint import CheckpointError, load_weights_only

# Per net kind: the labels of the encoder stages (res<label>, in the order they run; also the
# order the reference registers its RefineBlocks in) and of the RefineBlocks (refine<label>,
# coarsest first, the order they run and the order of scoretk's `decoder`). The deepest net's
# extra stage at 32 px is labelled 31 on both sides.
LABELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ncsn": (("1", "2", "3", "4"), ("1", "2", "3", "4")),
    "ncsnv2": (("1", "2", "3", "4"), ("1", "2", "3", "4")),
    "ncsnv2_deeper": (("1", "2", "3", "4", "5"), ("1", "2", "3", "4", "5")),
    "ncsnv2_deepest": (("1", "2", "3", "31", "4", "5"), ("1", "2", "31", "3", "4", "5")),
}
CLASS_NAMES = {"ncsn": "NCSN v1 CondRefineNetDilated", "ncsnv2": "NCSNv2",
               "ncsnv2_deeper": "NCSNv2Deeper", "ncsnv2_deepest": "NCSNv2Deepest"}
SIGMAS = "sigmas"  # NCSNv2's buffer: the noise levels, not a parameter
PREFIX = "module."  # DataParallel's
SIGMA_RTOL = 1e-6  # both sides are float32 roundings of the same float64 geometric sequence


# ---------------------------------------------------------------------------- the name map

def name_map(net: nn.Module, kind: str) -> dict[str, str]:
    """{released key: scoretk key} for every parameter of `net` (a scoretk RefineNet built as
    `kind`), in the order the released code registers them: the order of its state dict and
    of its Adam state's parameter ids."""
    if kind not in LABELS:
        raise CheckpointError(f"net {kind!r} has no released checkpoints; the released NCSN "
                              f"and NCSNv2 nets are scoretk's {', '.join(LABELS)}")
    names = {}
    for ref, ours, module in _modules(net, kind):
        for param in _param_order(module):
            names[f"{ref}.{param}"] = f"{ours}.{param}"
    unmapped = set(dict(net.named_parameters())) - set(names.values())
    if unmapped or len(names) != len(set(names.values())):
        raise RuntimeError(f"name_map does not cover the {kind} net one to one "
                           f"(unmapped: {sorted(unmapped)[:3]})")
    return names


def _param_order(module: nn.Module) -> list[str]:
    """The reference's InstanceNorm++ registers alpha, gamma, beta; scoretk's gamma, alpha,
    beta. Everything else has the same parameters in the same order."""
    own = [name for name, _ in module.named_parameters()]
    return ["alpha", "gamma", "beta"] if sorted(own) == ["alpha", "beta", "gamma"] else own


def _modules(net: nn.Module, kind: str) -> Iterator[tuple[str, str, nn.Module]]:
    """(released name, scoretk name, module), in the released registration order."""
    stage_labels, refine_labels = LABELS[kind]
    yield "begin_conv", "begin", net.begin
    yield "normalizer", "norm", net.norm
    yield "end_conv", "end", net.end
    for i, blocks in enumerate(net.encoder):
        for j, block in enumerate(blocks):
            ref, ours = f"res{stage_labels[i]}.{j}", f"encoder.{i}.{j}"
            for ref_name, name in (("conv1", "conv1"), ("normalize2", "norm2"), ("conv2", "conv2"),
                                   ("shortcut", "shortcut"), ("normalize1", "norm1")):
                yield f"{ref}.{ref_name}", f"{ours}.{name}", getattr(block, name)
    for label in stage_labels:  # registration order of the RefineBlocks
        k = refine_labels.index(label)
        yield from _refine_block(f"refine{label}", f"decoder.{k}", net.decoder[k])


def _refine_block(ref: str, ours: str, block: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    for i, rcu in enumerate(block.adapt):
        yield from _rcu(f"{ref}.adapt_convs.{i}", f"{ours}.adapt.{i}", rcu)
    yield from _rcu(f"{ref}.output_convs", f"{ours}.out", block.out)
    for part in ("msf", "crp"):  # each registers its convs, then its norms
        module = getattr(block, part)
        if module is None:
            continue
        for what in ("convs", "norms"):
            for i, layer in enumerate(getattr(module, what)):
                yield f"{ref}.{part}.{what}.{i}", f"{ours}.{part}.{what}.{i}", layer


def _rcu(ref: str, ours: str, rcu: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """Residual conv units: the reference names them `<block>_<stage>_{norm,conv}`, 1-based."""
    for b, unit in enumerate(rcu.units):
        for s, (norm, conv) in enumerate(unit):
            yield f"{ref}.{b + 1}_{s + 1}_norm", f"{ours}.units.{b}.{s}.0", norm
            yield f"{ref}.{b + 1}_{s + 1}_conv", f"{ours}.units.{b}.{s}.1", conv


def reference_state_dict(net: nn.Module, kind: str,
                         sigmas: Tensor | None = None) -> dict[str, Tensor]:
    """`net`'s weights under the released names and in the released order, as the released
    code's (unwrapped) net would hold them; with `sigmas` first for NCSNv2's buffer."""
    ours = net.state_dict()
    state = {SIGMAS: sigmas} if sigmas is not None else {}
    state.update({ref: ours[name] for ref, name in name_map(net, kind).items()})
    return state


def detect_kind(keys: list[str]) -> str:
    """Which released net a state dict belongs to, from its keys."""
    if any(k.endswith(".embed.weight") for k in keys):
        return "ncsn"
    if any(k.startswith("res31.") for k in keys):
        return "ncsnv2_deepest"
    if any(k.startswith("res5.") for k in keys):
        return "ncsnv2_deeper"
    return "ncsnv2"


# ---------------------------------------------------------------------------- the file

@dataclass
class ReleasedCheckpoint:
    """The entries of a released checkpoint, `module.` prefixes removed."""

    path: Path
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    step: int | None = None
    ema: dict[str, Tensor] | None = None
    layout: str = ""
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = detect_kind(list(self.model))

    def parameter_keys(self) -> list[str]:
        return [k for k in self.model if k != SIGMAS]


LAYOUTS = {2: "[model, optimizer]", 4: "[model, optimizer, epoch, step]",
           5: "[model, optimizer, epoch, step, ema]"}


def read_released(path: str | Path) -> ReleasedCheckpoint:
    """Load (weights only) and take apart a checkpoint saved by the released code."""
    path = Path(path)
    entries = load_weights_only(path)
    if isinstance(entries, dict) and "format" in entries:
        raise CheckpointError(f"{path}: already a scoretk checkpoint; sample or train from it "
                              "directly")
    if not isinstance(entries, (list, tuple)) or len(entries) not in LAYOUTS:
        what = f"a list of {len(entries)}" if isinstance(entries, (list, tuple)) \
            else type(entries).__name__
        raise CheckpointError(f"{path}: not a released NCSN/NCSNv2 checkpoint: expected a "
                              f"list {' or '.join(LAYOUTS.values())}, found {what}")
    model = _tensor_dict(path, entries[0], "the model state (entry 0)")
    optimizer = entries[1]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise CheckpointError(f"{path}: entry 1 is not an optimizer state dict")
    step = None
    if len(entries) >= 4:
        step = entries[3]
        if isinstance(step, Tensor) and step.numel() == 1:
            step = int(step)
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(f"{path}: entry 3 (the step) is not a whole number: {step!r}")
    ema = _tensor_dict(path, entries[4], "the EMA state (entry 4)") if len(entries) == 5 \
        else None
    return ReleasedCheckpoint(path, model, optimizer, step, ema, LAYOUTS[len(entries)])


def _tensor_dict(path: Path, value: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()):
        raise CheckpointError(f"{path}: {what} is not a dict of named tensors")
    if value and all(k.startswith(PREFIX) for k in value):
        value = {k[len(PREFIX):]: v for k, v in value.items()}
    return dict(value)


# ---------------------------------------------------------------------------- checks

def check_kind(ckpt: ReleasedCheckpoint, kind: str) -> None:
    if ckpt.kind != kind:
        raise CheckpointError(
            f"{ckpt.path}: the file holds an {CLASS_NAMES[ckpt.kind]} net, the recipe's net is "
            f"{kind!r}; use a recipe with net.kind {ckpt.kind!r} (the released code picks the "
            "net by dataset: CIFAR-10 and CelebA NCSNv2, LSUN NCSNv2Deeper, FFHQ NCSNv2Deepest)")


def check_tensors(path: Path, what: str, found: dict[str, Tensor],
                  expected: dict[str, tuple[int, ...]]) -> None:
    """The same keys (in any order) and shapes, or one line naming the first difference."""
    for key, shape in expected.items():
        if key not in found:
            raise CheckpointError(f"{path}: {what}: missing key {key!r}")
        if tuple(found[key].shape) != tuple(shape):
            raise CheckpointError(f"{path}: {what}: {key!r} has shape "
                                  f"{tuple(found[key].shape)}, the recipe's net needs "
                                  f"{tuple(shape)}{_shape_hint(key)}")
    for key in found:
        if key not in expected:
            raise CheckpointError(f"{path}: {what}: unexpected key {key!r}")


def _shape_hint(key: str) -> str:
    if key == "begin_conv.weight":
        return " (net.ngf and the data's channels)"
    if key.endswith(".embed.weight"):
        return " (one row per noise level: schedule.num_levels, and net.ngf)"
    return " (net.ngf)"


def check_sigmas(ckpt: ReleasedCheckpoint, sigmas: Tensor) -> None:
    """The file's noise levels against the recipe's schedule, naming the first that differs."""
    if SIGMAS not in ckpt.model:
        if ckpt.kind != "ncsn":
            raise CheckpointError(f"{ckpt.path}: model state: missing key {SIGMAS!r}")
        return
    theirs = ckpt.model[SIGMAS].double().flatten()
    ours = sigmas.double().cpu().flatten()
    if theirs.numel() != ours.numel():
        raise CheckpointError(f"{ckpt.path}: the file has {theirs.numel()} noise levels, the "
                              f"recipe's schedule {ours.numel()} (schedule.num_levels)")
    bad = ((theirs - ours).abs() > SIGMA_RTOL * ours.abs()).nonzero()
    if len(bad):
        i = int(bad[0])
        raise CheckpointError(f"{ckpt.path}: noise level {i} differs: sigma {float(theirs[i]):.6g} "
                              f"in the file, {float(ours[i]):.6g} in the recipe's schedule "
                              "(schedule.sigma_max, sigma_min, num_levels)")


# ---------------------------------------------------------------------------- conversion

def convert_weights(ckpt: ReleasedCheckpoint, net: nn.Module, kind: str,
                    sigmas: Tensor) -> dict[str, Tensor]:
    """Check the file against `net` (built from the recipe) and return the raw weights
    under scoretk's names. Every check runs before anything is changed."""
    check_kind(ckpt, kind)
    names = name_map(net, kind)
    ours = net.state_dict()
    expected = {ref: tuple(ours[name].shape) for ref, name in names.items()}
    if kind != "ncsn":  # the count is checked with the values, in check_sigmas
        expected = {SIGMAS: tuple(ckpt.model.get(SIGMAS, sigmas).shape), **expected}
    check_tensors(ckpt.path, "model state", ckpt.model, expected)
    check_sigmas(ckpt, sigmas)
    if ckpt.ema is not None:
        check_tensors(ckpt.path, "EMA state", ckpt.ema,
                      {k: v for k, v in expected.items() if k != SIGMAS})
    return {name: ckpt.model[ref] for ref, name in names.items()}


def ema_weights(ckpt: ReleasedCheckpoint, net: nn.Module, kind: str) -> dict[str, Tensor] | None:
    if ckpt.ema is None:
        return None
    return {name: ckpt.ema[ref] for ref, name in name_map(net, kind).items()}


def convert_adam_state(ckpt: ReleasedCheckpoint, net: nn.Module, kind: str) -> dict[int, dict]:
    """Adam's per-parameter state, re-keyed from the file's parameter ids (the order of the
    parameter keys in its model state) to the positions of scoretk's parameters."""
    names = name_map(net, kind)
    file_params = ckpt.parameter_keys()
    ids = [i for group in ckpt.optimizer["param_groups"] for i in group.get("params", [])]
    if len(ids) != len(file_params):
        raise CheckpointError(f"{ckpt.path}: the optimizer state covers {len(ids)} parameters, "
                              f"the model state holds {len(file_params)}")
    position = {name: i for i, (name, _) in enumerate(net.named_parameters())}
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    state = {}
    for pid, ref in zip(ids, file_params):
        per_param = ckpt.optimizer["state"].get(pid)
        if per_param is None:
            continue
        name = names[ref]
        for key, value in per_param.items():
            if isinstance(value, Tensor) and value.dim() and tuple(value.shape) != shapes[name]:
                raise CheckpointError(f"{ckpt.path}: optimizer state {key!r} of {ref!r} has "
                                      f"shape {tuple(value.shape)}, expected {shapes[name]}")
        state[position[name]] = dict(per_param)
    return state


def adam_step(ckpt: ReleasedCheckpoint) -> int:
    """The optimiser steps taken, as Adam counted them (the v1 list has no step entry)."""
    steps = [v.get("step", 0) for v in ckpt.optimizer["state"].values()]
    return int(max((float(s) for s in steps), default=0))

