"""Recipe -> the objects one training step needs. `scoretk train` and the benchmarks build
their step here, so a benchmark times exactly what users run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scoretk import assemble
from scoretk.components import Averager
from scoretk.execution.policy import ExecutionPolicy
from scoretk.recipe import OptimConfig, Recipe, RecipeError
from scoretk.registry import Registry
from scoretk.rng import derive_seed
from scoretk.training.step import TrainStep, make_optimiser


@dataclass
class Trainer:
    """The model, its optimiser and averager, and the step that updates them."""

    model: assemble.Model
    net: nn.Module  # the plain net: checkpoints and the averager see this one
    optimiser: torch.optim.Optimizer
    averager: Averager
    step: TrainStep
    optim: OptimConfig  # the recipe's: a resume applies it over the checkpoint's

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimiser.state_dict(),
                "averager": self.averager.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The checkpoint's weights, Adam moments and averages, with the recipe's optimiser
        settings: Adam's state_dict would bring back the old run's lr, betas, eps and decay."""
        self.net.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimizer"])
        self.averager.load_state_dict(state["averager"])
        for group in self.optimiser.param_groups:
            group.update(lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps,
                         weight_decay=self.optim.weight_decay)


def build_trainer(recipe: Recipe, registry: Registry, shape: tuple[int, ...],
                  policy: ExecutionPolicy) -> Trainer:
    """Fresh weights from the recipe's seed (the same on every rank and every run), placed
    and wrapped as the policy says."""
    torch.manual_seed(derive_seed(recipe.train.seed, "init"))
    model = assemble.build_model(recipe, registry, shape)
    if not any(p.requires_grad for p in model.net.parameters()):
        raise RecipeError(f"recipe {recipe.name!r}", "net", f"{recipe.net.kind!r} has no "
                          "trainable parameters: there is nothing to train; sample it from its "
                          "recipe: scoretk sample --recipe RECIPE --out F.h5")
    net = model.net = policy.place(model.net, shape)
    optimiser = make_optimiser(net, recipe.optim)
    averager = assemble.build_averager(recipe, registry, net)
    model.schedule.sigmas = model.schedule.sigmas.to(policy.device)
    step = TrainStep(net, policy.for_training_net(net), assemble.build_loss(recipe, registry),
                     model.schedule, optimiser, averager, clip=recipe.optim.grad_clip,
                     bf16=policy.uses_bf16)
    return Trainer(model, net, optimiser, averager, step, recipe.optim)
