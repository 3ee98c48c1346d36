"""matmul-limit: a training step's achieved FLOP/s as a fraction of this machine's matmul peak (MFU), the
rate the model's own layer shapes allow, and the machine's memory bandwidth (STREAM triad).

The peak is measured here, in the same dtype: the best of square matmuls of a
few sizes, each timed over several repetitions after a warm-up. A step's FLOPs
are counted by torch's FlopCounterMode over one forward and backward (matmuls,
convolutions and attention: the work that matters; elementwise ops are not
counted, as in the usual MFU definition), and its time is the median of
`repeats` timed rounds of `steps` steps through the Trainer (autocast in bf16,
fp32 master weights). MFU = (FLOPs per step / seconds per step) / peak.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from gradwise.config import load_config
from gradwise.memory.precision import autocast
from gradwise.train import StepEngine, Trainer
from gradwise.train.batch import fetch_batch

JOBS = {
    "default transformer (char LM, 4x128, context 128, batch 128)": ["data.name=text", "model.name=transformer",
                                                                      "data.max_chars=400000"],
    "default CNN (MNIST-1D, batch 128)": [],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = (512, 1024, 2048)


def matmul_peak(dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Best FLOP/s of an n x n @ n x n matmul over SIZES, each repeated for about `seconds`."""
    best = 0.0
    for n in SIZES:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or reps < 3:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def memory_bandwidth(elements: int = 1 << 25, seconds: float = 0.5) -> float:
    """This machine's memory bandwidth in bytes/s: the best STREAM triad (a = b + s * c, fp32 arrays of
    `elements`, far larger than the caches) over repetitions lasting about `seconds`, counting 12 bytes per
    element (two reads, one write; STREAM's convention, write-allocate traffic not counted)."""
    a, b, c = torch.empty(elements), torch.rand(elements), torch.rand(elements)
    torch.add(b, c, alpha=3.0, out=a)  # warm-up: pages touched
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t0)
    return 12 * elements / best


def shape_rate(model: torch.nn.Module, inputs, dtype: torch.dtype, repeats: int = 3) -> dict[str, Any]:
    """FLOP/s of the model's own Linear and Conv layers at the shapes a forward gives them: each layer's forward
    alone on a random input of its shape, in `dtype` (weights cast too), FLOPs counted by FlopCounterMode."""
    shapes: dict[str, tuple[int, ...]] = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))}
    def record(name: str):
        def hook(module, args, output) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    with torch.no_grad():
        model(inputs)
    for h in hooks:
        h.remove()
    flops = seconds = 0.0
    with torch.no_grad():
        for name, shape in shapes.items():
            layer = copy.deepcopy(layers[name]).to(dtype)
            x = torch.randn(shape, dtype=dtype)
            with FlopCounterMode(display=False) as counter:
                layer(x)
            layer(x)  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                layer(x)
            flops += counter.get_total_flops() * repeats
            seconds += time.perf_counter() - t0
    return {"layers": len(shapes), "gflops": flops / max(seconds, 1e-12) / 1e9}


def step_flops(engine: StepEngine, inputs, targets) -> int:
    """FLOPs of one forward and backward of the engine's model on this batch (FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        with autocast(engine.cfg.precision, engine.device):
            loss = engine.loss_fn(engine.model(inputs), targets)
        loss.backward()
    engine.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(overrides: list[str], precision: str, steps: int, repeats: int) -> dict[str, Any]:
    cfg = load_config(None, ["log.progress=off", "diagnostics.every=0", f"precision={precision}", *overrides])
    trainer = Trainer.from_config(cfg)
    engine = trainer.engine
    inputs, targets = fetch_batch(trainer.train_data, torch.arange(cfg.train.batch_size))
    flops = step_flops(engine, inputs, targets)
    shapes = shape_rate(engine.model, inputs, DTYPES[precision])
    for _ in range(3):
        engine.train_step((inputs, targets))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.train_step((inputs, targets))
        times.append((time.perf_counter() - t0) / steps)
    return {"flops_per_step": flops, "s_per_step": statistics.median(times), "shape_gflops": shapes["gflops"]}


def run(steps: int = 300, repeats: int = 5) -> dict[str, Any]:
    # A default transformer step is about a second on a 2-core CPU: a few rounds of a few steps make a stable median.
    steps, repeats = max(3, min(steps, 10)), max(1, min(repeats, 3))
    peaks = {name: matmul_peak(dtype) for name, dtype in DTYPES.items()}
    rows, raw = [], {}
    for job, overrides in JOBS.items():
        for precision in DTYPES:
            m = measure(overrides, precision, steps, repeats)
            achieved = m["flops_per_step"] / m["s_per_step"]
            raw[f"{job} {precision}"] = m
            rows.append({
                "job": job, "precision": precision, "GFLOP/step": m["flops_per_step"] / 1e9,
                "ms/step": m["s_per_step"] * 1e3, "achieved GFLOP/s": achieved / 1e9,
                "matmul peak GFLOP/s": peaks[precision] / 1e9, "MFU": achieved / peaks[precision],
                "model-shape GFLOP/s": m["shape_gflops"],
                "model-shape / peak": m["shape_gflops"] * 1e9 / peaks[precision],
            })
    bandwidth = memory_bandwidth()
    return {"steps": steps, "repeats": repeats, "rows": rows, "raw": raw,
            "peaks_gflops": {k: v / 1e9 for k, v in peaks.items()}, "memory_bandwidth_gbs": bandwidth / 1e9,
            "notes": ["MFU = counted matmul/conv/attention FLOPs of forward+backward per second, over this machine's "
                      "measured square-matmul peak in the same dtype (measured in this run).",
                      "model-shape GFLOP/s: the model's own Linear/Conv1d layers, each alone at the input shape a "
                      "forward gives it (forward only): the ceiling those shapes allow, below the square peak.",
                      f"memory bandwidth (STREAM triad, fp32, 12 bytes/element): {bandwidth / 1e9:.1f} GB/s."]}
