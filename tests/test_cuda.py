"""The GPU paths compute the same function as the CPU ones.

Skipped where torch sees no CUDA device, which includes CI: these run on a lent GPU machine
(`python -m pytest tests/test_cuda.py`), and benchmarks/README.md records when they last did.
TF32 is switched off here: cuDNN's default rounds convolution operands to 10 bits (~1e-3
relative), which would hide a real 1e-4 disagreement.
"""
from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from scoretk.checkpoint import load_checkpoint
from scoretk.execution.layout import ChannelsLast, in_preferred_layout
from scoretk.cli import main
from scoretk.plugins import default_registry
from scoretk.recipe import OptimConfig, Recipe
from scoretk.rng import PerSampleNoise, derive_seed, generator
from scoretk.training.step import TrainStep, make_optimiser
from scoretk.training import train
from scoretk_plugins.nets import layers
from scoretk_plugins.nets.ops import instance_norm_pp, instance_norm_pp_reference

from test_speed_paths import _compare, _inputs, _net, _norm_inputs, _run, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_norm_and_elu_on_cuda_match_the_formula(channels_last):
    """The fused InstanceNorm++ + ELU (hand-written backward) on the GPU against the plain
    formula in float64 on the CPU: values and all four gradients."""
    x, params = _norm_inputs(B=4, C=16, H=8, W=8, per_sample=True, dtype=torch.float32)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for device, dtype in ((CUDA, torch.float32), ("cpu", torch.float64)):
        xs = x.to(device, dtype, copy=True)
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        xs.requires_grad_()
        ps = [p.to(device, dtype, copy=True).requires_grad_() for p in params]
        if device == CUDA:
            out = instance_norm_pp(xs, *ps, elu_alpha=1.0)
        else:
            out = F.elu(instance_norm_pp_reference(xs, *ps))
        out.backward(grad.to(device, dtype))
        results.append([out, xs.grad, *(p.grad for p in ps)])
    for name, a, b in zip(("output", "x", "gamma", "alpha", "beta"), *results):
        assert_close(a, b, what=name)
    if channels_last:
        assert results[0][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["ncsnv2", "ncsn"])
@pytest.mark.parametrize("layout", ["auto", "input", "channels_last"])
def test_nets_on_cuda_agree_with_the_cpu(kind, layout):
    """A whole RefineNet on the GPU against the same weights run on the CPU in NCHW: output,
    input gradient and every parameter gradient. Layouts: the default (channels_last inside,
    NCHW in and out), plain NCHW throughout, channels_last weights and input."""
    net = _net(kind)
    x, sigma, level = _inputs()
    expected = _run(copy.deepcopy(net), x, sigma, level)
    gpu = copy.deepcopy(net).to(CUDA)
    xg, sg, lg = _to(CUDA, x, sigma, level)
    if layout == "channels_last":
        gpu = gpu.to(memory_format=torch.channels_last)
        xg = xg.contiguous(memory_format=torch.channels_last)
    elif layout == "auto":
        gpu = in_preferred_layout(gpu, CUDA)
        assert isinstance(gpu, ChannelsLast)
    got = _run(gpu, xg, sg, lg)
    _compare(got, expected, f"cuda, layout {layout}")
    assert got[0].is_cuda and got[0].is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_channels_last_pooling_gradients_on_cuda(kind):
    """CRP's 5x5 pooling of a channels_last activation: the input gradient matches the CPU's.
    (PyTorch's own channels_last avg-pool backward on CUDA is wrong with padding,
    pytorch/pytorch#188344; `ops.pool5x5` steers around it.)"""
    x = torch.randn(2, 6, 9, 7, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for device in ("cpu", CUDA):
        xs = x.to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = layers.pool5x5(xs, kind)
        out.backward(grad.to(device))
        results.append((out, xs.grad))
    assert_close(results[1][0], results[0][0], what="output")
    assert_close(results[1][1], results[0][1], what="input grad")
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)


def test_nchw_upsampling_on_cuda_matches_the_cpu():
    """MSF's bilinear upsampling takes the channels_last kernel for NCHW tensors on CUDA and
    hands back NCHW: same values and gradient as the CPU."""
    x = torch.randn(3, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(3, 5, 16, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for device in ("cpu", CUDA):
        xs = x.to(device, copy=True).requires_grad_()
        out = layers.upsample_bilinear(xs, (16, 16))
        out.backward(grad.to(device))
        results.append((out, xs.grad))
    assert_close(results[1][0], results[0][0], what="output")
    assert_close(results[1][1], results[0][1], what="input grad")
    assert results[1][0].is_contiguous()


@pytest.mark.slow
def test_inductor_on_cuda_agrees_with_eager():
    """torch.compile (inductor, Triton kernels) of a whole NCSNv2: outputs and gradients."""
    net = _net("ncsnv2").to(CUDA)
    inputs = _to(CUDA, *_inputs())
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(net))
    _compare(_run(compiled, *inputs), _run(net, *inputs), "compiled (inductor, cuda)")


def _step_on_cuda(bf16: bool, x: torch.Tensor):
    registry = default_registry()
    net = _net("ncsnv2").to(CUDA)
    schedule = registry.build("schedule", {"kind": "geometric", "sigma_max": 5.0,
                                           "sigma_min": 0.1, "num_levels": 4})
    schedule.sigmas = schedule.sigmas.to(CUDA)
    optimiser = make_optimiser(net, OptimConfig(lr=1e-3))
    averager = registry.build("averager", {"kind": "ema", "rate": 0.9}, model=net)
    step = TrainStep(net, net, registry.build("loss", {"kind": "dsm"}), schedule, optimiser,
                     averager, bf16=bf16)
    loss, grad_norm, _ = step(x, generator(derive_seed(0, "step", 0, 0), CUDA), 0)
    return float(loss), float(grad_norm), step.first_bad(), net


def test_bf16_training_step_is_close_to_float32():
    """bf16 autocast changes rounding, not the loss: the same batch, levels and noise give a
    loss and gradient norm within bf16's precision of the float32 step, and the parameters
    stay float32 (autocast casts copies)."""
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(CUDA)
    loss32, norm32, bad32, _ = _step_on_cuda(False, x)
    loss16, norm16, bad16, net = _step_on_cuda(True, x)
    assert bad32 == bad16 == -1
    assert abs(loss16 - loss32) / loss32 < 3e-2, (loss16, loss32)
    assert abs(norm16 - norm32) / norm32 < 1e-1, (norm16, norm32)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_per_sample_noise_on_cuda_does_not_depend_on_the_batch():
    """Sample 5's noise is the same in a batch of 8 (rows 0-7) and in a batch of 3 (rows 4-6)."""
    whole = PerSampleNoise(7, range(8), CUDA)
    part = PerSampleNoise(7, range(4, 7), CUDA)
    for _ in range(2):  # the second draw continues each sample's own stream
        a, b = whole.randn((3, 4, 4)), part.randn((3, 4, 4))
        assert a.is_cuda and a.shape == (8, 3, 4, 4) and b.shape == (3, 3, 4, 4)
        assert torch.equal(a[4:7], b)
    assert not torch.equal(a[0], a[1])


def test_training_on_cuda_resumes_exactly(tmp_path, toy_recipe):
    """The CUDA generator state travels in the checkpoint: 10 + 10 steps give the weights of
    20 uninterrupted steps (an MLP: no convolution algorithm choice in the way)."""
    toy_recipe["train"].update(device="cuda", iterations=20, checkpoint_every=5, batch_size=32)
    registry = default_registry()
    straight = load_checkpoint(train(Recipe.from_dict(toy_recipe, registry), registry,
                                     tmp_path / "a"))
    half = copy.deepcopy(toy_recipe)
    half["train"]["iterations"] = 10
    train(Recipe.from_dict(half, registry), registry, tmp_path / "b")
    resumed = load_checkpoint(train(Recipe.from_dict(toy_recipe, registry), registry,
                                    tmp_path / "b"))
    assert straight["step"] == resumed["step"] == 20
    for name, a in straight["model"].items():
        assert torch.equal(a, resumed["model"][name]), name


def test_train_and_sample_on_cuda_through_the_cli(tmp_path):
    """`scoretk train` and `scoretk sample --device cuda` end to end on a small NCSNv2; the
    samples do not depend on the batch size (to float rounding: cuDNN may pick another
    algorithm per batch shape)."""
    run = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "recipes/ncsnv2_digits.yaml", "--run-dir", str(run),
        "-o", "net={kind: ncsnv2, ngf: 8}", "-o", "data.size=16", "-o", "train.device=cuda",
        "-o", "train.iterations=20", "-o", "train.batch_size=16", "-o", "train.log_every=10",
        "-o", "train.time_limit_minutes=null", "-o", "train.checkpoint_every=10"])
    assert result.exit_code == 0, result.output
    files = []
    for batch in (6, 4):
        out = tmp_path / f"b{batch}.h5"
        result = CliRunner().invoke(main, [
            "sample", "--run", str(run), "--out", str(out), "-n", "6", "--batch-size",
            str(batch), "--device", "cuda", "--keep-float", "-o", "sampler.steps_per_level=3"])
        assert result.exit_code == 0, result.output
        files.append(out)
    with h5py.File(files[0]) as a, h5py.File(files[1]) as b:
        fa, fb = a["samples_float"][:], b["samples_float"][:]
        assert a["samples"].shape == (6, 16, 16, 1) and np.isfinite(fa).all()
    np.testing.assert_allclose(fa, fb, rtol=0, atol=1e-3)
