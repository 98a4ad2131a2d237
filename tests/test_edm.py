"""Net `edm` and loss `edm`: EDM's preconditioning and loss weight against their formulas
(Karras et al. 2022, Table 1), the Gaussian cases where they are exact, and the nested
`inner` block validated like a recipe section.

For data N(m, sigma_d^2 I) the exact denoiser is D* = m + c_skip (x~ - m): the edm net with an
inner net that outputs 0 is the exact score, and at that optimum the weighted loss
lambda ||D* - x||^2 is chi^2_D at every sigma (mean D, variance 2D), which is what the
weighting is for.
"""
import math

import pytest
import torch
import yaml
from torch import nn

from scoretk import assemble
from scoretk.execution.layout import ChannelsLast, in_preferred_layout
from scoretk.plugins import load_plugins
from scoretk.recipe import Recipe, RecipeError
from scoretk_plugins.losses import EDMLoss
from scoretk.registry import Params
from scoretk_plugins.nets.edm import EDMNet, edm_coefficients, edm_loss_weight
from scoretk_plugins.schedules import LogNormalParams, LogNormalSchedule

SIGMAS = torch.tensor([0.002, 0.05, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)


@pytest.mark.parametrize("sigma_data", [0.25, 0.5, 1.3])
def test_coefficients_and_weight_against_the_formulas(sigma_data):
    c_skip, c_out, c_in, c_noise = edm_coefficients(SIGMAS, sigma_data)
    for i, s in enumerate(SIGMAS.tolist()):
        assert c_skip[i].item() == pytest.approx(sigma_data**2 / (s**2 + sigma_data**2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(s * sigma_data / math.sqrt(s**2 + sigma_data**2),
                                                rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sigma_data**2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    weight = edm_loss_weight(SIGMAS, sigma_data)
    expected = (SIGMAS**2 + sigma_data**2) / (SIGMAS * sigma_data) ** 2
    assert torch.allclose(weight, expected, rtol=1e-12)
    assert torch.allclose(weight, 1 / c_out**2, rtol=1e-12)
    # what the coefficients are for, for data of standard deviation sigma_data: F's input
    # c_in x~ and its target (x - c_skip x~)/c_out both have unit variance
    var_input = c_in**2 * (sigma_data**2 + SIGMAS**2)
    var_target = ((1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * SIGMAS**2) / c_out**2
    assert torch.allclose(var_input, torch.ones_like(SIGMAS), rtol=1e-12)
    assert torch.allclose(var_target, torch.ones_like(SIGMAS), rtol=1e-12)


class Recorder(nn.Module):
    """An inner net with a known output, recording what it was given."""

    accepts_any_sigma, batch_independent, prefers_channels_last = False, True, True

    def forward(self, x, sigma, level):
        self.seen = (x, sigma, level)
        return torch.sin(3 * x) + sigma.view(-1, *(1,) * (x.dim() - 1))


def test_net_preconditions_its_inner_net():
    sigma_data, mean = 0.4, 0.3
    net = EDMNet(Recorder(), sigma_data, mean)
    # carried from the inner net, so the execution policy treats the composite as it
    assert not net.accepts_any_sigma and net.batch_independent and net.prefers_channels_last
    assert isinstance(in_preferred_layout(net, torch.device("cpu")), ChannelsLast)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(len(SIGMAS), 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 0.5
    level = torch.arange(len(SIGMAS))
    score = net(x, SIGMAS, level)
    u, sigma_in, seen_level = net.inner.seen
    s = SIGMAS.view(-1, 1, 1, 1)
    c_skip, c_out, c_in, _ = (c.view(-1, 1, 1, 1) for c in edm_coefficients(SIGMAS, sigma_data))
    assert torch.allclose(u, c_in * (x - mean), rtol=1e-12)
    assert torch.allclose(sigma_in, SIGMAS ** 0.25, rtol=1e-12)  # log of it is c_noise
    assert torch.equal(seen_level, level)
    f = sigma_in.view(-1, 1, 1, 1) * (torch.sin(3 * u) + sigma_in.view(-1, 1, 1, 1))
    denoised = mean + c_skip * (x - mean) + c_out * f
    assert torch.allclose(net.denoise(x, SIGMAS, level), denoised, rtol=1e-12)
    assert torch.allclose(score, (denoised - x) / s**2, rtol=1e-9, atol=1e-9)


class Zero(nn.Module):
    def forward(self, x, sigma, level):
        return torch.zeros_like(x)


def test_zero_inner_net_is_the_gaussian_score():
    net = EDMNet(Zero(), 0.3, 0.5)
    x = torch.randn(len(SIGMAS), 5, dtype=torch.float64)
    exact = -(x - 0.5) / (SIGMAS[:, None] ** 2 + 0.3**2)  # N(0.5, 0.3^2) noised at sigma
    assert torch.allclose(net(x, SIGMAS, torch.zeros(len(SIGMAS), dtype=torch.long)), exact,
                          rtol=1e-12)


def test_loss_at_the_gaussian_optimum_is_D_at_every_level():
    D, B, sigma_data, mean = 6, 100_000, 0.3, 0.5
    g = torch.Generator().manual_seed(1)
    x = mean + sigma_data * torch.randn(B, D, generator=g, dtype=torch.float64)
    schedule = LogNormalSchedule(LogNormalParams(p_mean=-1.0, p_std=1.2, sigma_max=5.0,
                                                 sigma_min=0.02, num_levels=6))
    loss, stats = EDMLoss(sigma_data)(EDMNet(Zero(), sigma_data, mean), x, schedule, g)
    assert abs(loss.item() - D) < 4 * math.sqrt(2 * D / B)
    n = stats["level_count"].double()
    assert (n > 1000).all()
    per_level = stats["level_loss_sum"] / n
    assert ((per_level - D).abs() < 4 * (2 * D / n).sqrt()).all()
    # a worse denoiser (the right one, shrunk) costs more
    worse, _ = EDMLoss(sigma_data)(EDMNet(Zero(), 0.8 * sigma_data, mean), x, schedule,
                                   torch.Generator().manual_seed(1))
    assert worse.item() > loss.item() + 10 * math.sqrt(2 * D / B)


# --- the nested block -----------------------------------------------------------------------

class TinyParams(Params):
    width: int = 3


class Tiny(nn.Module):
    """A third-party net (registered by the test, not a built-in): edm must take it too."""

    def __init__(self, width):
        super().__init__()
        self.width, self.scale = width, nn.Parameter(torch.ones(()))

    def forward(self, x, sigma, level):
        return self.scale * x


@pytest.fixture
def registry():
    reg = load_plugins(autoload=False).registry
    reg.add("net", "tiny", lambda p, **_: Tiny(p.width), TinyParams, plugin="third_party")
    return reg


def edm_recipe(toy_recipe, **net):
    toy_recipe["schedule"] = {"kind": "log_normal", "sigma_max": 5.0, "sigma_min": 0.01,
                              "num_levels": 8}
    toy_recipe["net"] = {"kind": "edm", "inner": {"kind": "mlp", "hidden": 16, "depth": 1},
                         **net}
    toy_recipe["loss"] = {"kind": "edm"}
    return toy_recipe


@pytest.mark.parametrize("inner, field, message", [
    ({"kind": "mlp", "hidden": 0}, "net.inner.hidden", "greater than 0"),
    ({"kind": "mlp", "hiden": 8}, "net.inner.hiden", "unknown field"),
    ({"kind": "tiny", "width": "wide"}, "net.inner.width", "valid integer"),
    ({"kind": "mpl"}, "net.inner.kind", "unknown net 'mpl' (did you mean 'mlp'?)"),
    ({"hidden": 8}, "net.inner.kind", "Field required"),
    (3, "net.inner", "expected a mapping like {kind: <net name>, ...}, got int"),
    ({"kind": "edm", "inner": {"kind": "mlp", "depth": -1}}, "net.inner.inner.depth",
     "greater than 0"),
])
def test_nested_block_errors_name_the_dotted_field(registry, toy_recipe, inner, field, message):
    raw = edm_recipe(toy_recipe)
    raw["net"]["inner"] = inner
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(raw, registry, "r.yaml")
    assert err.value.field == field and message in err.value.message
    assert str(err.value).startswith(f"r.yaml: {field}: ") and "\n" not in str(err.value)


def test_missing_inner_and_bad_outer_params(registry, toy_recipe):
    raw = edm_recipe(toy_recipe, sigma_data=-1)
    with pytest.raises(RecipeError, match=r"net\.sigma_data\b.*greater than 0"):
        Recipe.from_dict(raw, registry)
    del raw["net"]["inner"]
    raw["net"]["sigma_data"] = 0.5
    with pytest.raises(RecipeError, match="net.inner: Field required"):
        Recipe.from_dict(raw, registry)


def test_round_trip_resolve_and_build(registry, toy_recipe):
    raw = edm_recipe(toy_recipe)
    raw["net"]["inner"] = {"kind": "tiny", "width": 5}
    recipe = Recipe.from_dict(raw, registry)
    dumped = recipe.dump()
    assert dumped["net"] == {"kind": "edm", "inner": {"kind": "tiny", "width": 5},
                             "sigma_data": "auto", "data_mean": 0.5}
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml()), registry).dump() == dumped
    assert assemble.needs_data(recipe) == ["net.sigma_data", "loss.sigma_data"]
    with pytest.raises(ValueError, match="net.sigma_data is 'auto'"):
        recipe.net.params.resolve(None)
    with pytest.raises(assemble.ComponentError, match="net.sigma_data is 'auto'"):
        assemble.build_model(recipe, registry, (2,))

    data = assemble.build_data(recipe, registry)
    resolved = assemble.resolve(recipe, data)
    values = torch.stack([data[i] for i in range(len(data))]).double()
    assert resolved.net.params.sigma_data == pytest.approx(values.std().item(), rel=1e-9)
    assert resolved.loss.params.sigma_data == resolved.net.params.sigma_data
    assert "standard deviation" in resolved.net.params.notes[0]
    net = assemble.build_model(resolved, registry, data.shape).net
    assert isinstance(net, EDMNet) and isinstance(net.inner, Tiny) and net.inner.width == 5
    assert net.data_mean == 0.5 and net.sigma_data == resolved.net.params.sigma_data
    assert Recipe.from_dict(resolved.dump(), registry).dump() == resolved.dump()


def test_data_mean_auto_is_measured(registry, toy_recipe):
    recipe = Recipe.from_dict(edm_recipe(toy_recipe, sigma_data=0.5, data_mean="auto"), registry)
    data = assemble.build_data(recipe, registry)
    resolved = assemble.resolve(recipe, data).net.params
    values = torch.stack([data[i] for i in range(len(data))]).double()
    assert resolved.data_mean == pytest.approx(values.mean().item(), abs=1e-9)
    assert resolved.sigma_data == 0.5  # given, kept
    assert len(resolved.notes) == 1 and "mean" in resolved.notes[0]
