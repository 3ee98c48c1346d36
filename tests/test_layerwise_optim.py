"""LARS and LAMB against slow per-parameter references written from the papers' equations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwise.optim.layerwise as layerwise
from gradwise.optim import LAMB, LARS, param_groups


@pytest.fixture(autouse=True)
def many_chunks(monkeypatch):
    """Every tensor its own chunk and two threads, so the concurrent chunk path is what gets tested."""
    monkeypatch.setattr(layerwise, "CPU_CHUNK_BYTES", 512)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(steps=20):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(steps)]


def grads_at(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters()]


def excluded(p):  # the default exclusion rule, restated: 1-D tensors (biases, LayerNorm weights)
    return p.ndim <= 1


@torch.no_grad()
def reference_lamb_step(params, grads, state, lr, beta1, beta2, eps, wd, clip, seen):
    """You et al. 2019 (v5) Algorithm 2, one tensor at a time."""
    for i, (w, g) in enumerate(zip(params, grads)):
        s = state.setdefault(i, {"t": 0, "m": torch.zeros_like(w), "v": torch.zeros_like(w)})
        s["t"] += 1
        s["m"] = beta1 * s["m"] + (1 - beta1) * g
        s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
        m_hat = s["m"] / (1 - beta1 ** s["t"])
        v_hat = s["v"] / (1 - beta2 ** s["t"])
        decay = 0.0 if excluded(w) else wd
        u = m_hat / (v_hat.sqrt() + eps) + decay * w
        ratio = 1.0
        if not excluded(w):
            w_norm, u_norm = float(w.norm()), float(u.norm())
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            seen.append(ratio)
            if clip is not None:
                ratio = min(ratio, clip)
        w -= lr * ratio * u


@torch.no_grad()
def reference_lars_step(params, grads, state, lr, momentum, wd, eta, clip, seen):
    """You et al. 2017 with momentum, one tensor at a time."""
    for i, (w, g) in enumerate(zip(params, grads)):
        decay = 0.0 if excluded(w) else wd
        local = 1.0
        if not excluded(w):
            w_norm, g_norm = float(w.norm()), float(g.norm())
            local = eta * w_norm / (g_norm + decay * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
            seen.append(local)
            if clip is not None:
                local = min(local, clip)
        v = state.get(i, torch.zeros_like(w))
        state[i] = momentum * v + lr * local * (g + decay * w)
        w -= state[i]


def run_pair(make_optimizer, reference_step, steps=20):
    ours_model = make_model()
    ref_model = copy.deepcopy(ours_model)
    opt = make_optimizer(param_groups(ours_model, weight_decay=0.01))
    state, seen = {}, []
    for x, y in batches(steps):
        grads = grads_at(ours_model, x, y)
        before = [g.clone() for g in grads]
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, grads)), "p.grad was modified"
        reference_step(list(ref_model.parameters()), grads_at(ref_model, x, y), state, seen)
    return ours_model, ref_model, opt, seen


@pytest.mark.parametrize("clip", [None, 0.3])
def test_lamb_matches_the_paper_for_20_steps(clip):
    ours, ref, opt, seen = run_pair(
        lambda groups: LAMB(groups, lr=0.02, betas=(0.9, 0.99), eps=1e-6, trust_clip=clip),
        lambda params, grads, state, seen: reference_lamb_step(params, grads, state, 0.02, 0.9, 0.99, 1e-6, 0.01,
                                                               clip, seen),
    )
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if clip is not None:
        assert max(seen) > clip  # the clipping really bit
    assert sum(1 for p in ours.parameters() if "trust_ratio" in opt.state[p]) == 3  # only the 3 weight matrices


@pytest.mark.parametrize("clip", [None, 0.002])
def test_lars_matches_the_paper_for_20_steps(clip):
    ours, ref, opt, seen = run_pair(
        lambda groups: LARS(groups, lr=2.0, momentum=0.9, trust_coefficient=0.001, trust_clip=clip),
        lambda params, grads, state, seen: reference_lars_step(params, grads, state, 2.0, 0.9, 0.01, 0.001, clip,
                                                               seen),
    )
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if clip is not None:
        assert max(seen) > clip


def test_trust_ratio_is_one_when_a_norm_is_zero():
    # ||w|| = 0: LAMB takes a plain Adam-direction step, LARS a plain SGD step
    w = nn.Parameter(torch.zeros(4, 4))
    w.grad = torch.ones(4, 4)
    lamb = LAMB([w], lr=0.1, eps=1e-6)
    lamb.step()
    assert float(lamb.state[w]["trust_ratio"]) == 1.0
    torch.testing.assert_close(w.detach(), torch.full((4, 4), -0.1 / (1 + 1e-6)))
    w = nn.Parameter(torch.zeros(4, 4))
    w.grad = torch.ones(4, 4)
    lars = LARS([w], lr=0.1, momentum=0.0)
    lars.step()
    assert float(lars.state[w]["trust_ratio"]) == 1.0
    torch.testing.assert_close(w.detach(), torch.full((4, 4), -0.1))
    # ||g|| = 0 for LARS: local lr 1, and a zero step
    w = nn.Parameter(torch.ones(2, 2))
    w.grad = torch.zeros(2, 2)
    lars = LARS([w], lr=0.1, momentum=0.0)
    lars.step()
    assert float(lars.state[w]["trust_ratio"]) == 1.0 and torch.equal(w.detach(), torch.ones(2, 2))


@pytest.mark.parametrize("cls, kwargs", [(LAMB, {"lr": 0.01}), (LARS, {"lr": 1.0})])
def test_state_dict_round_trip_resumes_exactly(cls, kwargs):
    straight_model, split_model = make_model(), make_model()
    straight = cls(param_groups(straight_model, 0.01), **kwargs)
    split = cls(param_groups(split_model, 0.01), **kwargs)
    data = batches(10)
    for x, y in data:
        grads_at(straight_model, x, y)
        straight.step()
    for x, y in data[:5]:
        grads_at(split_model, x, y)
        split.step()
    saved = copy.deepcopy(split.state_dict())
    resumed = cls(param_groups(split_model, 0.01), **kwargs)
    resumed.load_state_dict(saved)
    for x, y in data[5:]:
        grads_at(split_model, x, y)
        resumed.step()
    for a, b in zip(straight_model.parameters(), split_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls, kwargs", [(LAMB, {"lr": 0.01}), (LARS, {"lr": 1.0})])
def test_low_precision_params_keep_fp32_state(cls, kwargs):
    w = nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
    b = nn.Parameter(torch.randn(8).to(torch.bfloat16))  # a non-adapted group (LAMB's flat path)
    w.grad = torch.randn(8, 8).to(torch.bfloat16)
    b.grad = torch.randn(8).to(torch.bfloat16)
    before = [w.detach().clone(), b.detach().clone()]
    opt = cls([{"params": [w]}, {"params": [b], "adapt": False}], **kwargs)
    opt.step()
    for p, old in zip((w, b), before):
        assert p.dtype == torch.bfloat16 and not torch.equal(old, p)
        assert all(v.dtype == torch.float32 for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.ndim)


def test_param_groups_default_and_patterns():
    model = make_model()
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [3, 5] and groups[1]["weight_decay"] == 0 and not groups[1]["adapt"]
    groups = param_groups(model, 0.1, exclude=["0.*", "*.bias"])
    names = dict((id(p), n) for n, p in model.named_parameters())
    assert sorted(names[id(p)] for p in groups[1]["params"]) == ["0.bias", "0.weight", "1.bias", "3.bias", "5.bias"]


@pytest.mark.parametrize("cls, kwargs", [(LAMB, {"lr": 0.01}), (LARS, {"lr": 1.0})])
def test_concurrent_chunks_are_bit_identical_to_a_sequential_sweep(cls, kwargs, monkeypatch):
    models = [make_model(), make_model()]
    optimizers = [cls(param_groups(m, 0.01), **kwargs) for m in models]
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=g) for p in models[0].parameters()] for _ in range(5)]
    for concurrent, model, opt in zip((True, False), models, optimizers):
        monkeypatch.setattr(layerwise, "CONCURRENT_CHUNKS", concurrent)
        for step_grads in grads:
            for p, grad in zip(model.parameters(), step_grads):
                p.grad = grad.clone()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
