"""Averagers: the EMA recurrence, warm-up, in-place swapping, checkpoint round trip."""
import io

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from scoretk_plugins import averagers

from conftest import registry_of


def build(model, **spec):
    return registry_of(averagers).build("averager", spec, model=model)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def perturb(model, k):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (k + 1))
        model[1].running_mean.fill_(float(k))


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_recurrence(warmup):
    model = make_model()
    ema = build(model, kind="ema", rate=0.9, warmup=warmup)
    manual = [p.detach().clone().double() for p in model.parameters()]
    for n in range(6):
        perturb(model, n)
        m = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        assert ema.effective_rate() == pytest.approx(m)
        ema.update(model)
        manual = [m * s + (1 - m) * p.detach().double() for s, p in zip(manual, model.parameters())]
    for s, ref in zip(ema.shadow, manual):
        torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=1e-6)
    assert ema.n == 6
    assert ema.buffers[0].eq(5).all()  # buffers are copied, not averaged


def test_warmup_rate_formula():
    ema = averagers.EMA(make_model(), rate=0.999, warmup=True)
    assert ema.effective_rate(0) == pytest.approx(0.1)
    assert ema.effective_rate(90) == pytest.approx(91 / 100)
    assert ema.effective_rate(10**6) == 0.999  # capped at rate once (1+n)/(10+n) exceeds it
    assert averagers.EMA(make_model(), rate=0.999).effective_rate(0) == 0.999


def test_averaged_swaps_in_and_restores():
    model = make_model()
    ema = build(model, kind="ema", rate=0.5)
    perturb(model, 0)
    ema.update(model)
    perturb(model, 1)
    live = [p.detach().clone() for p in model.parameters()]
    avg = [s.clone() for s in ema.shadow]
    params = list(model.parameters())
    x = torch.randn(5, 3)
    with ema.averaged(model) as m:
        assert m is model and list(m.parameters())[0] is params[0]  # same Parameter objects
        for p, a in zip(model.parameters(), avg):
            assert torch.equal(p, a)  # the model now shows the averages
        out = model.eval()(x)
    for p, ref in zip(model.parameters(), live):
        assert torch.equal(p, ref)  # restored
    assert all(torch.equal(s, a) for s, a in zip(ema.shadow, avg))
    with pytest.raises(RuntimeError):
        with ema.averaged(model):
            raise RuntimeError("boom")
    for p, ref in zip(model.parameters(), live):
        assert torch.equal(p, ref)  # restored after an exception too
    assert out.shape == (5, 2)


def test_averaged_output_equals_a_model_with_averaged_weights():
    model = make_model().eval()
    ema = build(model, kind="ema", rate=0.7)
    for k in range(3):
        perturb(model, k)
        ema.update(model)
    ref = make_model().eval()
    with torch.no_grad():
        for p, s in zip(ref.parameters(), ema.shadow):
            p.copy_(s)
        for b, s in zip(ref.buffers(), ema.buffers):
            b.copy_(s)
    x = torch.randn(7, 3)
    with ema.averaged(model):
        torch.testing.assert_close(model(x), ref(x))


def test_state_dict_round_trip():
    model = make_model()
    ema = build(model, kind="ema", rate=0.8, warmup=True)
    for k in range(4):
        perturb(model, k)
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build(make_model(), kind="ema", rate=0.8, warmup=True)
    fresh.load_state_dict(state)
    assert fresh.n == 4 and fresh.effective_rate() == ema.effective_rate()
    for a, b in zip(fresh.shadow + fresh.buffers, ema.shadow + ema.buffers):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        averagers.EMA(nn.Linear(2, 2)).load_state_dict(state)


def test_none():
    model = make_model()
    avg = build(model, kind="none")
    before = [p.detach().clone() for p in model.parameters()]
    avg.update(model)
    with avg.averaged(model) as m:
        assert m is model
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    avg.load_state_dict(avg.state_dict())


@pytest.mark.parametrize("bad", [{"rate": 1.0}, {"rate": 0}, {"rate": -0.5}, {"decay": 0.9}])
def test_params_validation(bad):
    with pytest.raises(ValidationError):
        build(make_model(), kind="ema", **bad)
    with pytest.raises(ValidationError):
        build(make_model(), kind="none", rate=0.9)
