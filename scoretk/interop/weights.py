"""`scoretk export`: one set of weights in a safetensors file, for sharing.

safetensors holds tensors and a string-to-string header, and nothing that unpickles: loading
one cannot run code. The header carries what sampling needs besides the weights (the resolved
recipe and the item shape), which weights these are (`averaged` or `raw`), the training step
and the versions. `load_exported` returns the same dict a scoretk checkpoint holds, minus the
optimiser and averager, so `scoretk sample --checkpoint MODEL.safetensors` works from it.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import scoretk
from scoretk.checkpoint import CheckpointError, atomic_write

EXPORT_FORMAT = "scoretk-weights-1"
SUFFIX = ".safetensors"
_EXTRA = "safetensors files need the 'safetensors' package: pip install 'scoretk[safetensors]'"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError(_EXTRA) from None
    return safetensors


def export_weights(state: dict[str, Any], tensors: dict[str, Tensor], out: str | Path, *,
                   weights: str) -> None:
    """Write `tensors` (a net's state dict) with the checkpoint `state`'s recipe, shape and
    step to `out`, atomically."""
    st = _safetensors()
    metadata = {"format": EXPORT_FORMAT, "weights": weights,
                "recipe": json.dumps(state["recipe"], sort_keys=True),
                "shape": json.dumps([int(n) for n in state["shape"]]),
                "step": str(int(state.get("step", 0))),
                "scoretk_version": scoretk.__version__, "torch_version": str(torch.__version__),
                "safetensors_version": st.__version__}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    blob = st.torch.save(tensors, metadata=metadata)
    atomic_write(out, lambda f: f.write(blob))


def load_exported(path: str | Path) -> dict[str, Any]:
    """An exported file as a checkpoint-like dict: model, recipe, shape, step, weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - the library raises its own types on bad files
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({type(exc).__name__})") from None
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: not exported by scoretk (no '{EXPORT_FORMAT}' format "
                              "in its metadata)")
    try:
        return {"model": tensors, "recipe": json.loads(metadata["recipe"]),
                "shape": json.loads(metadata["shape"]), "step": int(metadata["step"]),
                "weights": metadata["weights"]}
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete scoretk metadata ({exc})") from None


def exported_weights_are_raw(path: Path, state: dict[str, Any], raw_weights: bool) -> bool:
    """Sampling from an exported file uses the one set of weights it holds. Returns whether
    they are the raw ones; asking for raw weights from an averaged export is refused."""
    if raw_weights and state["weights"] != "raw":
        raise CheckpointError(f"{path}: holds the {state['weights']} weights only; export with "
                              "--raw-weights to sample with the raw ones")
    return state["weights"] == "raw"


def chosen_weights(net: torch.nn.Module, averager: Any,
                   raw_weights: bool) -> dict[str, Tensor]:
    """The net's state dict with the averaged weights swapped in (or the raw ones), copied."""
    swap = contextlib.nullcontext() if raw_weights else averager.averaged(net)
    with swap:
        return {k: v.detach().clone() for k, v in net.state_dict().items()}
