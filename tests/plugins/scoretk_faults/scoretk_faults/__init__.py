"""Components that fail on purpose, for the fault tests: they act only when told to by their
params, and leave a file saying what they did (the tests wait for it)."""
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from scoretk import hookimpl
from scoretk.components import ScoreNet
from scoretk.registry import Params
from scoretk_plugins.datasets import Toy2dParams, build_toy2d
from scoretk_plugins.nets import MLPParams, build_mlp


class KillOnceParams(MLPParams):
    marker: str = ""  # the net acts once: only while this file does not exist, then makes it
    kill_at: int = 0  # the training forward pass (1, 2, ...) of this process at which to act
    rank: int = 0  # the torchrun rank that acts
    pause: float = 0.0  # > 0: sleep this long instead of killing (a step that takes a while)


class KillOnce(nn.Module):
    """The 'mlp' net, which at its `kill_at`-th training forward on `rank` SIGKILLs its own
    process (or pauses), once: a marker file records that it happened."""

    def __init__(self, net: nn.Module, p: KillOnceParams):
        super().__init__()
        self.net, self.p, self.calls = net, p, 0

    def forward(self, x, sigma, level):
        if self.training:
            self.calls += 1
            if (self.calls == self.p.kill_at and int(os.environ.get("RANK", "0")) == self.p.rank
                    and not os.path.exists(self.p.marker)):
                Path(self.p.marker).write_text(f"{os.getpid()}\n")
                if self.p.pause:
                    time.sleep(self.p.pause)
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
        return self.net(x, sigma, level)


def build_kill_once(p: KillOnceParams, *, shape, num_levels) -> KillOnce:
    return KillOnce(build_mlp(p, shape=shape, num_levels=num_levels), p)


class Frozen(ScoreNet):
    """The score of N(0, I) perturbed by sigma, with nothing to learn."""

    def forward(self, x, sigma, level):
        return -x / (1 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


class WaitingParams(Toy2dParams):
    ready: str = ""  # written when the dataset starts building
    seconds: float = 60.0


def build_waiting(p: WaitingParams):
    """toy2d data that takes `seconds` to build: a window in which to signal the command."""
    Path(p.ready).write_text(f"{os.getpid()}\n")
    time.sleep(p.seconds)
    return build_toy2d(p)


@hookimpl
def scoretk_register(registry):
    registry.add("net", "kill_once", build_kill_once, KillOnceParams,
                 "mlp that kills its process once (tests)")
    registry.add("net", "frozen", lambda p, shape, num_levels: Frozen(), Params,
                 "a net without parameters (tests)")
    registry.add("dataset", "waiting", build_waiting, WaitingParams,
                 "toy2d that takes a while to build (tests)")
