"""Averagers `ema` and `none` (NCSNv2 Technique 5: docs/theory.md#ema).

The EMA keeps one shadow tensor per parameter and evaluates by swapping storage pointers
(`.data`) into the live model, so sampling with averaged weights never holds a second model.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from pydantic import Field
from torch import nn

from scoretk import hookimpl
from scoretk.components import Averager
from scoretk.registry import Params


class EMAParams(Params):
    rate: float = Field(0.999, gt=0, lt=1, description="m in theta' <- m theta' + (1 - m) theta")
    warmup: bool = Field(False, description="use min(rate, (1+n)/(10+n)) at update n, so early "
                                            "averages are not dominated by the random init")


class EMA(Averager):
    def __init__(self, model: nn.Module, rate: float = 0.999, warmup: bool = False):
        self.rate, self.warmup, self.n = rate, warmup, 0
        self.shadow = [p.detach().clone() for p in model.parameters()]
        self.buffers = [b.detach().clone() for b in model.buffers()]

    def effective_rate(self, n: int | None = None) -> float:
        n = self.n if n is None else n
        return min(self.rate, (1 + n) / (10 + n)) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        self._check(params, self.shadow, "parameters")
        if params and self.shadow[0].device != params[0].device:  # model moved after we were built
            self.shadow = [s.to(p.device) for s, p in zip(self.shadow, params)]
            self.buffers = [s.to(b.device) for s, b in zip(self.buffers, model.buffers())]
        w = 1 - self.effective_rate()
        floats = [(s, p) for s, p in zip(self.shadow, params) if s.is_floating_point()]
        others = [(s, p) for s, p in zip(self.shadow, params) if not s.is_floating_point()]
        if floats:
            torch._foreach_lerp_([s for s, _ in floats], [p for _, p in floats], w)
        buffers = [(s, b.detach()) for s, b in zip(self.buffers, model.buffers())] + others
        if buffers:
            torch._foreach_copy_([s for s, _ in buffers], [b for _, b in buffers])
        self.n += 1

    def state_dict(self) -> dict:
        """Live references (like nn.Module.state_dict); torch.save copies them."""
        return {"n": self.n, "rate": self.rate, "shadow": list(self.shadow),
                "buffers": list(self.buffers)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("shadow", self.shadow), ("buffers", self.buffers)):
            self._check(state[key], mine, key)
            for dst, src in zip(mine, state[key]):
                dst.copy_(src)
        self.n = int(state["n"])

    @contextlib.contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        live = list(model.parameters()) + list(model.buffers())
        saved = self.shadow + self.buffers
        self._check(live, saved, "parameters and buffers")
        swap = lambda: [_swap(t, s) for t, s in zip(live, saved)]  # noqa: E731
        swap()
        try:
            yield model
        finally:
            swap()

    @staticmethod
    def _check(a: list, b: list, what: str) -> None:
        if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
            raise ValueError(f"EMA {what} do not match the model's ({len(a)} vs {len(b)} tensors "
                             "or different shapes): was the averager built for another model?")


def _swap(t: torch.Tensor, s: torch.Tensor) -> None:
    t.data, s.data = s.data, t.data


class NoAverage(Averager):
    """Evaluate with the trained weights themselves."""

    def update(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @contextlib.contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        yield model


def build_ema(params: EMAParams, *, model: nn.Module) -> EMA:
    return EMA(model, params.rate, params.warmup)


def build_none(params: Params, *, model: nn.Module) -> NoAverage:
    return NoAverage()


@hookimpl
def scoretk_register(registry) -> None:
    registry.add("averager", "ema", build_ema, EMAParams,
                 "exponential moving average of the weights (optional warm-up)")
    registry.add("averager", "none", build_none, Params, "no averaging: use the trained weights")
