"""End to end on the NCSN toy: a trained MLP's DSM loss gets close to the exact score's loss.

For the mixture 0.2 N((-5,-5), I) + 0.8 N((5,5), I) the noised density at sigma is the mixture of
N(mu_k, (1 + sigma^2) I), so its score, and with it the minimum of the DSM loss, is exact.
"""
from __future__ import annotations

import torch
from torch import nn

from scoretk import assemble
from scoretk.checkpoint import load_checkpoint
from scoretk.plugins import default_registry
from scoretk.recipe import Recipe
from scoretk.training import train

WEIGHTS, MEANS = torch.tensor([0.2, 0.8]), torch.tensor([[-5.0, -5.0], [5.0, 5.0]])


class ExactMixtureScore(nn.Module):
    def forward(self, x, sigma, level):
        var = 1 + sigma[:, None, None] ** 2  # (B, 1, 1)
        diff = MEANS[None] - x[:, None, :]  # (B, K, 2)
        logits = WEIGHTS.log()[None] - 0.5 * (diff ** 2).sum(-1) / var[:, :, 0]
        resp = logits.softmax(dim=1)[..., None]
        return (resp * diff / var).sum(1)


def test_trained_mlp_approaches_the_exact_dsm_minimum(tmp_path, toy_recipe):
    toy_recipe["data"]["n"] = 20000
    toy_recipe["net"] = {"kind": "mlp", "hidden": 64, "depth": 2}
    toy_recipe["averager"] = {"kind": "none"}
    toy_recipe["train"].update(iterations=1500, batch_size=256, checkpoint_every=1500,
                               log_every=500)
    registry = default_registry()
    recipe = Recipe.from_dict(toy_recipe, registry)
    state = load_checkpoint(train(recipe, registry, tmp_path))

    model = assemble.build_model(recipe, registry, (2,))
    model.net.load_state_dict(state["model"])
    loss_fn = assemble.build_loss(recipe, registry)
    data = assemble.build_data(recipe, registry).batch(torch.arange(20000))

    def loss_of(net):
        with torch.no_grad():
            return loss_fn(net, data, model.schedule, torch.Generator().manual_seed(7))[0].item()

    exact, trained = loss_of(ExactMixtureScore()), loss_of(model.net)
    print(f"DSM loss: exact score {exact:.4f}, trained mlp {trained:.4f}")
    untrained = loss_of(assemble.build_model(recipe, registry, (2,)).net)
    assert exact <= trained * 1.01  # nothing beats the true score (up to MC noise)
    assert trained <= exact * 1.05, (trained, exact)  # stated tolerance: within 5%
    assert untrained > exact * 1.5  # the test can tell a trained net from an untrained one
