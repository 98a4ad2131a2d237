"""Score networks: exact sizes of the reference nets, conditioning, shapes, registry wiring."""
from __future__ import annotations

import pydantic
import pytest
import torch

import scoretk_plugins.nets as nets_plugin
from scoretk.assemble import count_parameters
from scoretk.components import ScoreNet
from scoretk.plugins import load_plugins
from scoretk.registry import Registry
from scoretk_plugins.nets.layers import CondInstanceNormPP, InstanceNormPP

from conftest import registry_of

NAMES = ["ncsn", "ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest", "convnet", "mlp"]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return registry_of(nets_plugin, "nets")


def build(registry: Registry, kind: str, shape, num_levels: int = 10, device=None, **params):
    with torch.device(device or "cpu"):
        return registry.build("net", {"kind": kind, **params}, shape=shape,
                              num_levels=num_levels)


def meta_count(registry, kind, shape, num_levels=10, **params) -> int:
    return count_parameters(build(registry, kind, shape, num_levels, device="meta", **params))


# -------------------------------------------------- sizes (docs/theory.md#parameter-counts)

@pytest.mark.parametrize("kind, ngf, shape, num_levels, expected", [
    ("ncsnv2", 128, (3, 32, 32), 232, 29_694_083),
    ("ncsnv2", 64, (1, 28, 28), 10, 7_426_881),
    ("ncsnv2_deeper", 128, (3, 128, 128), 1086, 83_445_379),
    ("ncsnv2_deepest", 128, (3, 256, 256), 2311, 94_132_611),
    ("ncsn", 128, (3, 32, 32), 10, 30_117_635),
    ("ncsn", 128, (3, 32, 32), 232, 39_750_659),
    ("ncsn", 64, (1, 28, 28), 10, 7_638_657),
])
def test_reference_parameter_counts(registry, kind, ngf, shape, num_levels, expected):
    assert meta_count(registry, kind, shape, num_levels, ngf=ngf) == expected


@pytest.mark.parametrize("kind", ["ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest"])
def test_v2_size_independent_of_num_levels(registry, kind):
    sizes = {meta_count(registry, kind, (3, 64, 64), L, ngf=16) for L in (1, 10, 2311)}
    assert len(sizes) == 1


def test_v1_size_linear_in_num_levels(registry):
    n = {L: meta_count(registry, "ncsn", (3, 32, 32), L) for L in (9, 10, 11, 232)}
    per_level = n[11] - n[10]
    assert per_level > 0 and n[10] - n[9] == per_level
    assert n[232] - n[10] == 222 * per_level == 39_750_659 - 30_117_635


# ------------------------------------------------------------------ norms
# (their formula, in every code path: test_instance_norm_pp.py)

def test_norm_init():
    torch.manual_seed(0)
    C, L = 256, 40
    w = CondInstanceNormPP(C, L).embed.weight.detach()
    assert w.shape == (L, 3 * C)
    ga = w[:, :2 * C]
    assert abs(ga.mean() - 1) < 0.002 and abs(ga.std() - 0.02) < 0.002
    assert torch.all(w[:, 2 * C:] == 0)
    plain = InstanceNormPP(C)
    assert count_parameters(plain) == 3 * C and torch.all(plain.beta == 0)
    assert abs(plain.gamma.mean() - 1) < 0.01 and abs(plain.alpha.std() - 0.02) < 0.01


def test_instance_norm_pp_whitens_each_channel_but_keeps_channel_offsets():
    norm = InstanceNormPP(4)
    with torch.no_grad():
        norm.gamma.fill_(1), norm.alpha.fill_(0), norm.beta.zero_()
    x = torch.randn(2, 4, 8, 8) * 5 + torch.arange(4.).view(1, 4, 1, 1) * 10
    out = norm(x)
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(2, 3), unbiased=False), torch.ones(2, 4),
                               atol=1e-3, rtol=0)
    with torch.no_grad():
        norm.alpha.fill_(1)
    means = norm(x).mean(dim=(2, 3))  # channel means come back, ordered like the input's
    assert torch.all(means[:, 1:] > means[:, :-1])


# ------------------------------------------------------------------ forward behaviour

def _inputs(shape, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *shape, generator=g)
    sigma = torch.tensor([0.5, 2.0][:batch])
    level = torch.tensor([1, 3][:batch])
    return x, sigma, level


@pytest.mark.parametrize("kind, shape", [
    ("ncsn", (1, 28, 28)), ("ncsn", (3, 32, 32)),
    ("ncsnv2", (1, 28, 28)), ("ncsnv2", (3, 32, 32)),
    ("ncsnv2_deeper", (3, 16, 16)), ("ncsnv2_deepest", (3, 16, 16)),
])
def test_image_nets_forward_shape(registry, kind, shape):
    torch.manual_seed(0)
    net = build(registry, kind, shape, ngf=8)
    assert isinstance(net, ScoreNet)
    x, sigma, level = _inputs(shape)
    out = net(x, sigma, level)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["ncsnv2", "ncsnv2_deeper"])
def test_v2_output_scales_as_one_over_sigma_and_ignores_level(registry, kind):
    torch.manual_seed(0)
    net = build(registry, kind, (3, 16, 16), ngf=8).eval()
    x, sigma, level = _inputs((3, 16, 16))
    with torch.no_grad():
        out = net(x, sigma, level)
        for k in (0.1, 7.0):
            torch.testing.assert_close(net(x, sigma * k, level), out / k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net(x, sigma, level + 5), out)
    assert out.abs().mean() > 0


def test_v1_reads_level_not_sigma(registry):
    torch.manual_seed(0)
    net = build(registry, "ncsn", (1, 28, 28), ngf=8).eval()
    x, sigma, level = _inputs((1, 28, 28))
    with torch.no_grad():
        out = net(x, sigma, level)
        torch.testing.assert_close(net(x, sigma * 10, level), out)
        assert not torch.allclose(net(x, sigma, level + 1), out)
        with pytest.raises(IndexError):  # levels are embedding rows: 0..L-1
            net(x, sigma, torch.tensor([10, 0]))


@pytest.mark.parametrize("kind", ["ncsn", "ncsnv2"])
def test_every_parameter_gets_a_gradient(registry, kind):
    torch.manual_seed(0)
    net = build(registry, kind, (3, 32, 32), ngf=4)
    x, sigma, level = _inputs((3, 32, 32))
    net(x, sigma, level).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


# ------------------------------------------------------------------ mlp

def test_mlp_shape_and_sigma_scaling(registry):
    torch.manual_seed(0)
    net = build(registry, "mlp", (2,), hidden=32, depth=2, sigma_input=False)
    x, sigma, level = torch.randn(5, 2), torch.rand(5) + 0.1, torch.zeros(5, dtype=torch.long)
    out = net(x, sigma, level)
    assert out.shape == (5, 2)
    torch.testing.assert_close(net(x, sigma * 3, level), out / 3)


def test_mlp_sigma_input_conditions_beyond_scaling(registry):
    torch.manual_seed(0)
    net = build(registry, "mlp", (2,), hidden=32, activation="tanh")
    assert net.net[0].in_features == 3
    x, level = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    s1, s2 = torch.full((4,), 0.1), torch.full((4,), 5.0)
    with torch.no_grad():
        out = net(x, s1, level)
        assert out.shape == (4, 2)
        assert not torch.allclose(net(x, s2, level) * s2[:, None], out * s1[:, None])


def test_mlp_params_validated(registry):
    with pytest.raises(pydantic.ValidationError):
        build(registry, "mlp", (2,), activation="os.system")
    with pytest.raises(pydantic.ValidationError):
        build(registry, "mlp", (2,), depth=0)


# ------------------------------------------------------------------ registry and validation

def test_registered_names(registry):
    assert set(NAMES) <= set(registry.names("net"))
    assert all(registry.get("net", n).description for n in NAMES)


def test_build_through_registry(registry):
    net = registry.build("net", {"kind": "ncsnv2", "ngf": 8}, shape=(3, 32, 32), num_levels=10)
    assert isinstance(net, ScoreNet)
    with pytest.raises(pydantic.ValidationError):
        registry.build("net", {"kind": "ncsnv2", "ngff": 8}, shape=(3, 32, 32), num_levels=10)
    with pytest.raises(pydantic.ValidationError):
        registry.build("net", {"kind": "ncsn", "ngf": 0}, shape=(3, 32, 32), num_levels=10)


@pytest.mark.parametrize("kind, shape, match", [
    ("ncsnv2", (3, 31, 32), "divisible by 2"),
    ("ncsnv2_deeper", (3, 30, 32), "divisible by 4"),
    ("ncsnv2_deepest", (3, 36, 36), "divisible by 8"),
    ("ncsn", (2,), "image data"),
])
def test_unsupported_shapes_are_clear_errors(registry, kind, shape, match):
    with pytest.raises(ValueError, match=match):
        build(registry, kind, shape, device="meta", ngf=4)


def test_loaded_as_a_plugin():
    info = {p.name: p for p in load_plugins(autoload=False).plugins}["nets"]
    assert info.ok, info.error
    assert {c.name for c in info.components} == set(NAMES)


def test_convnet_shape_and_sigma_normalisation():
    from scoretk_plugins.nets.convnet import ConvNetParams, build_convnet

    torch.manual_seed(0)
    net = build_convnet(ConvNetParams(channels=16, blocks=2, sigma_input=False),
                        shape=(1, 8, 8), num_levels=5)
    x, level = torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)
    out = net(x, torch.full((3,), 0.5), level)
    assert out.shape == x.shape
    torch.testing.assert_close(net(x, torch.full((3,), 2.0), level), out / 4)
    with pytest.raises(ValueError, match="image data"):
        build_convnet(ConvNetParams(), shape=(2,), num_levels=5)
