"""One optimisation step of `scoretk train`, on its own so the benchmarks time the same code.

The loop around it (data, checkpoints, signals, logging) is in `scoretk.training`.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from scoretk.components import Averager, Loss, Schedule
from scoretk.recipe import OptimConfig


def make_optimiser(net: nn.Module, optim: OptimConfig) -> torch.optim.Adam:
    """Adam with the recipe's settings, fused into one kernel over all parameters where torch
    has one for them (CPU and CUDA floats). Small nets feel the per-parameter overhead most:
    with TrainStep's unclipped norm, a quick-start training step runs 1.08x faster."""
    params = list(net.parameters())
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                 for p in params)
    return torch.optim.Adam(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                            weight_decay=optim.weight_decay, **({"fused": True} if fused else {}))


class TrainStep:
    """One optimisation step: loss, backward, gradient norm (clipped if configured), Adam,
    averager. `scoretk.training.train` runs it, and `benchmarks/bench_train.py` times this same
    object, so the benchmark measures the loop users run.

    Finiteness is tracked on the device (`first_bad`), so a step never waits for the host;
    the loop asks only before it logs or saves.
    """

    def __init__(self, net: nn.Module, train_net: nn.Module, loss_fn: Loss, schedule: Schedule,
                 optimiser: torch.optim.Optimizer, averager: Averager, *,
                 clip: float | None = None, bf16: bool = False):
        self.net, self.train_net, self.loss_fn, self.schedule = net, train_net, loss_fn, schedule
        self.optimiser, self.averager, self.clip = optimiser, averager, clip
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 \
            else nullcontext
        device = self.params[0].device if self.params else torch.device("cpu")
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def __call__(self, x: Tensor, generator: torch.Generator | None,
                 step: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(loss, gradient norm, loss stats) of step `step`, all detached, on the device."""
        with self.autocast():
            loss, stats = self.loss_fn(self.train_net, x, self.schedule, generator)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is None:  # measure only: skips clip_grad_norm_'s multiply by 1.0
            grad_norm = nn.utils.get_total_norm([p.grad for p in self.params
                                                 if p.grad is not None])
        else:
            grad_norm = nn.utils.clip_grad_norm_(self.params, self.clip)
        loss = loss.detach()
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        bad = self._first_bad
        self._first_bad = torch.where((bad < 0) & ~finite, torch.full_like(bad, step + 1), bad)
        self.optimiser.step()
        self.averager.update(self.net)
        return loss, grad_norm.detach(), stats

    def first_bad(self) -> int:
        """1 + the first step whose loss or gradient was not finite, or -1 (a host sync)."""
        return int(self._first_bad.item())
