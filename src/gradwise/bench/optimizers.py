"""Optimizer step time: gradwise LAMB/LARS against the peers' implementations, AdamW as gradwise builds it
against torch's foreach and fused paths, and each as a multiple of its memory-bandwidth floor.

The model is a character transformer with >= 200 parameter tensors. Every
contender gets its own copy of the same parameters, the same fixed gradients
and the same two parameter groups (weight decay 0.01 on matrices), and only
`optimizer.step()` is timed. Contenders alternate in rounds; times are medians
over rounds, and each ratio is the median over rounds of (peer time / gradwise
time in the same round), which cancels the machine's drift between rounds. Peers come from the
`bench` extra (`pip install -e '.[bench]'`) and are skipped when missing.
Peers with an opt-in foreach path are timed both ways.
"""

from __future__ import annotations

import copy
import importlib
import statistics
import time
from typing import Any, Callable

import torch

from gradwise.bench.matmul import memory_bandwidth
from gradwise.config import OptimConfig
from gradwise.nn import CharTransformer
from gradwise.optim import LAMB, LARS, param_groups
from gradwise.optim.factory import optimizer_for_groups

Factory = Callable[[list[dict]], torch.optim.Optimizer]


def _peer(module: str, attr: str, **kwargs) -> Factory | None:
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    return lambda groups: cls(groups, **kwargs)


def contenders() -> dict[str, dict[str, Factory | None]]:
    lamb = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6)
    return {
        "LAMB": {
            "gradwise": lambda g: LAMB(g, **lamb),
            "pytorch-optimizer": _peer("pytorch_optimizer", "Lamb", max_grad_norm=0.0, **lamb),
            "pytorch-optimizer (foreach)": _peer("pytorch_optimizer", "Lamb", max_grad_norm=0.0, foreach=True, **lamb),
            "torch-optimizer": _peer("torch_optimizer", "Lamb", **lamb),
        },
        "AdamW": {  # gradwise trains with torch's AdamW as build_optimizer makes it; torch's other two paths
            "gradwise": lambda g: optimizer_for_groups(OptimConfig(name="adamw", lr=1e-3, eps=1e-6), g),
            "torch (foreach)": lambda g: torch.optim.AdamW(g, lr=1e-3, eps=1e-6, foreach=True),
            "torch (fused)": lambda g: torch.optim.AdamW(g, lr=1e-3, eps=1e-6, fused=True),
        },
        "LARS": {
            "gradwise": lambda g: LARS(g, lr=1.0, momentum=0.9, trust_coefficient=0.001),
            "pytorch-optimizer": _peer("pytorch_optimizer", "LARS", lr=1.0, momentum=0.9, trust_coefficient=0.001),
            "pytorch-optimizer (foreach)": _peer("pytorch_optimizer", "LARS", lr=1.0, momentum=0.9,
                                                 trust_coefficient=0.001, foreach=True),
        },
    }


# The least memory traffic of one step, bytes per fp32 parameter: every tensor read once, every updated one
# written once. AdamW and LAMB read p, g, m, v and write p, m, v; LARS (momentum) reads p, g, m, writes p, m.
FLOOR_BYTES = {"AdamW": 28, "LAMB": 28, "LARS": 20}


def make_model(n_layer: int = 17, d_model: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=96, context=64, n_layer=n_layer, d_model=d_model, n_head=4)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return model


def time_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps


def run(steps: int = 20, repeats: int = 5) -> dict[str, Any]:
    base = make_model()
    n_tensors, n_params = sum(1 for _ in base.parameters()), sum(p.numel() for p in base.parameters())
    bandwidth = memory_bandwidth()
    rows, notes, raw = [], [f"model: CharTransformer n_layer=17 d_model=128, {n_tensors} parameter tensors, "
                            f"{sum(p.numel() for p in base.parameters())} parameters"], {}
    for family, entries in contenders().items():
        optimizers = {}
        for name, factory in entries.items():
            if factory is None:
                notes.append(f"{family}: {name} not installed (pip install -e '.[bench]'), skipped")
                continue
            model = copy.deepcopy(base)
            for p, q in zip(model.parameters(), base.parameters()):
                p.grad = q.grad.clone()
            optimizers[name] = factory(param_groups(model, 0.01))
            time_steps(optimizers[name], 3)  # state initialisation
        times: dict[str, list[float]] = {name: [] for name in optimizers}
        for _ in range(repeats):
            for name, opt in optimizers.items():
                times[name].append(time_steps(opt, steps))
        raw[family] = times
        ratios = {n: statistics.median(p / o for p, o in zip(t, times["gradwise"]))
                  for n, t in times.items() if n != "gradwise"}
        floor = FLOOR_BYTES[family] * n_params / bandwidth
        for name in times:
            rows.append({"optimizer": family, "implementation": name, "ms/step": statistics.median(times[name]) * 1e3,
                         "peer / gradwise (median of rounds)": ratios.get(name, 1.0),
                         "x bandwidth floor": statistics.median(times[name]) / floor})
        if ratios:
            fastest = min(ratios, key=ratios.get)
            notes.append(f"{family}: gradwise is {ratios[fastest]:.2f}x faster than the fastest peer ({fastest})")
    notes.append(f"bandwidth floor: {FLOOR_BYTES} bytes per parameter x {n_params} parameters over this run's "
                 f"STREAM triad bandwidth, {bandwidth / 1e9:.1f} GB/s (gradwise.bench.matmul.memory_bandwidth)")
    return {"steps": steps, "repeats": repeats, "rows": rows, "notes": notes, "raw_seconds": raw,
            "memory_bandwidth_gbs": bandwidth / 1e9}
