"""fp16/bf16 range analysis and loss-scale advice (issue 9), checked against real half-precision arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradwise import load_config
from gradwise.config import ScalerConfig
from gradwise.diagnostics.numerics import (FORMATS, Histogram, analyse, loss_scale_for, lost_update_fraction,
                                          range_fractions)
from gradwise.memory.precision import LossScaler
from gradwise.train import Trainer
from gradwise.train.metrics import read_metrics
from gradwise.tools.precision import collect


def log_uniform(n: int, low_exp: float, high_exp: float, seed: int = 0) -> torch.Tensor:
    """Values with random signs whose log2 is uniform, nudged off exact powers of two (no rounding ties)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.empty(n, dtype=torch.float64).uniform_(low_exp, high_exp, generator=g)
    e = torch.floor(e) + 0.1 + 0.8 * (e - torch.floor(e))  # stay inside buckets, away from their edges
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return (signs * torch.pow(2.0, e)).float()


def test_histogram_buckets_are_binary_exponents():
    h = Histogram()
    h.add(torch.tensor([1.0, 1.5, 0.75, -3.0, 0.0, 0.0, 2.0 ** -30]))
    assert h.counts == {0: 2, -1: 1, 1: 1, -30: 1} and h.zeros == 2 and h.total == 7


def test_histogram_counts_match_a_value_by_value_reference():
    """The one-pass histogram = math.frexp on every value: zeros, inf/nan (above every range), fp32
    subnormals, bf16 input."""
    import math

    from gradwise.diagnostics.numerics import MAX_EXPONENT, MIN_EXPONENT

    x = torch.cat([log_uniform(5000, -149, 127), torch.tensor([0.0, -0.0, float("inf"), float("-inf"),
                                                                 float("nan"), 1e-45, 3e38, 1.0])])
    for values in (x, x[:3000].to(torch.bfloat16)):
        h = Histogram()
        h.add(values)
        counts, zeros = {}, 0
        for v in values.float().tolist():
            if v == 0:
                zeros += 1
                continue
            k = MAX_EXPONENT if not math.isfinite(v) else min(max(math.frexp(v)[1] - 1, MIN_EXPONENT), MAX_EXPONENT)
            counts[k] = counts.get(k, 0) + 1
        assert h.counts == counts and h.zeros == zeros and h.total == values.numel()


@pytest.mark.parametrize("fmt, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_range_fractions_match_casting_to_the_format(fmt, dtype):
    x = log_uniform(200_000, -140, 130) if fmt == "bf16" else log_uniform(200_000, -30, 20)
    x = x[torch.isfinite(x)]
    # The analysis counts everything below the smallest subnormal as flushed; rounding to nearest keeps the
    # octave just below it as that subnormal, so leave that one octave out of the comparison.
    k = FORMATS[fmt].min_subnormal_exp
    x = x[(x.abs() < 2.0 ** (k - 1)) | (x.abs() >= 2.0 ** k)]
    h = Histogram()
    h.add(x)
    ours = range_fractions(h, FORMATS[fmt])
    cast = x.to(dtype).float()
    smallest_normal = 2.0 ** FORMATS[fmt].min_normal_exp
    reference = {
        "overflow": float(torch.isinf(cast).float().mean()),
        "flush_to_zero": float((cast == 0).float().mean()),
        "subnormal": float(((cast != 0) & (cast.abs() < smallest_normal)).float().mean()),
    }
    for key in reference:
        assert ours[key] == pytest.approx(reference[key], abs=2e-4), key
    assert ours["flush_to_zero"] > 0.01 and ours["subnormal"] > 0.01  # the comparison covered each case
    if fmt == "fp16":  # (fp32 values cannot exceed bf16's range, which is fp32's)
        assert ours["overflow"] > 0.05


def test_lost_updates_match_fp16_addition():
    g = torch.Generator().manual_seed(1)
    w = torch.empty(50_000).uniform_(0.5, 2.0, generator=g)
    dw = w * log_uniform(50_000, -16, -6, seed=2)
    h = Histogram()
    h.add(dw.abs() / w.abs())
    lost_in_fp16 = ((w.half() + dw.half()) == w.half()).float().mean().item()
    ratio = dw.abs() / w.abs()
    # Half an ulp of w is between 2^-12 and 2^-11 of |w| (where w sits in its binade), so the real loss lies
    # between the two criteria; the analysis reports the conservative one, |dw| / |w| < 2^-11.
    assert (ratio < 2.0 ** -12).float().mean() <= lost_in_fp16 <= lost_update_fraction(h, FORMATS["fp16"])
    assert lost_update_fraction(h, FORMATS["fp16"]) == pytest.approx(float((ratio < 2.0 ** -11).float().mean()),
                                                                     abs=1e-3)
    assert 0.2 < lost_in_fp16 < 0.8


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def tiny_trainer(model: nn.Module, *extra: str, x_scale: float = 1.0) -> Trainer:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * x_scale
    y = torch.randint(0, 4, (256,), generator=g)
    cfg = load_config(None, ["train.batch_size=64", "train.steps=4", "log.progress=off", "log.plots=false",
                             "diagnostics.every=0", "optim.name=sgd", "optim.lr=0.1", *extra])
    return Trainer(model, TensorDataset(x, y), config=cfg)


def underflowing_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), Scale(1e-6))  # gradients ~1e-8


def overflowing_model() -> nn.Module:
    torch.manual_seed(0)
    first = nn.Linear(16, 32)
    with torch.no_grad():
        first.weight.mul_(1e6)  # activations ~1e5..1e6, above fp16's 65504
    return nn.Sequential(first, nn.ReLU(), Scale(1e-5), nn.Linear(32, 4))


def well_scaled_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_flags_a_model_whose_gradients_underflow_in_fp16():
    report = analyse(collect(tiny_trainer(underflowing_model()), steps=3))
    fp16, bf16 = report["totals"]["fp16"], report["totals"]["bf16"]
    assert fp16["gradients"]["flush_to_zero"] > 0.3
    assert bf16["gradients"]["flush_to_zero"] == 0 and fp16["activations"]["overflow"] == 0
    assert report["loss_scale_log2"] >= 16  # the advice is a large scale ...
    assert fp16["gradients_at_loss_scale"]["flush_to_zero"] < 1e-3  # ... that lifts them into range
    assert report["at_risk"]["fp16"] and not report["at_risk"]["bf16"]


def zero_grad_fraction_in_fp16(model: nn.Module, scale: float, precision: str = "fp16") -> float:
    """Train-mode autocast backward of one batch with a given fp16 loss scale; share of zero weight gradients."""
    trainer = tiny_trainer(model, f"precision={precision}", f"scaler.init_scale={scale}")
    x, y = trainer.train_data.tensors[0][:64], trainer.train_data.tensors[1][:64]
    _, finite = trainer.engine.gradients((x, y))
    assert finite
    grads = [p.grad for p in trainer.engine.params if p.grad is not None and p.ndim > 1]
    return sum(int((g == 0).sum()) for g in grads) / sum(g.numel() for g in grads)


def test_the_recommended_loss_scale_removes_the_underflow_in_real_fp16():
    report = analyse(collect(tiny_trainer(underflowing_model()), steps=3))
    unscaled = zero_grad_fraction_in_fp16(underflowing_model(), 1.0)
    scaled = zero_grad_fraction_in_fp16(underflowing_model(), report["loss_scale"])
    fp32_zeros = zero_grad_fraction_in_fp16(underflowing_model(), 1.0, precision="fp32")  # structural (dead ReLUs)
    assert unscaled > 0.5  # fp16 without a scale: most weight gradients are flushed to zero
    assert scaled < 0.1 and scaled < unscaled / 5
    assert scaled <= fp32_zeros + 0.05  # scaled fp16 keeps about as many gradients as fp32 itself


def test_flags_a_model_whose_activations_overflow_in_fp16():
    report = analyse(collect(tiny_trainer(overflowing_model()), steps=2))
    assert report["totals"]["fp16"]["activations"]["overflow"] > 0.05
    assert report["totals"]["bf16"]["activations"]["overflow"] == 0
    assert "0" in report["at_risk"]["fp16"]  # the first Linear, by name
    assert report["recommendation"]["fp16_setting"] is None  # a loss scale cannot fix the forward pass
    assert report["recommendation"]["setting"] == "precision=bf16"


def test_a_well_scaled_model_raises_no_flag():
    report = analyse(collect(tiny_trainer(well_scaled_model()), steps=3))
    fp16 = report["totals"]["fp16"]
    assert fp16["activations"]["overflow"] == 0 and fp16["gradients"]["overflow"] == 0
    assert fp16["gradients"]["flush_to_zero"] < 1e-3
    assert report["recommendation"]["fp16_setting"] is not None


def test_loss_scale_keeps_the_largest_gradient_below_fp16_max():
    h = Histogram()
    h.add(torch.tensor([3.0e-3, 1e-6, 2e-7]))
    s = loss_scale_for(h)
    assert 3.0e-3 * 2.0 ** s < 65504 / 2 <= 3.0e-3 * 2.0 ** (s + 2)
    h.add(torch.tensor([1e6]))  # already above fp16's range: scale down
    assert loss_scale_for(h) < 0


def test_scaler_history_is_logged_and_plotted(tmp_path):
    from gradwise.cli import main

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "data.num_samples=300", "model.name=mlp", "model.width=16",
                 "train.batch_size=32", "train.steps=30", "precision=fp16", "scaler.init_scale=1e9",
                 "scaler.growth_interval=3", "log.progress=off"]) == 0
    events = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "scaler"]
    overflows = [e for e in events if e["event"] == "overflow"]
    assert overflows and any(e["event"] == "growth" for e in events)  # clean steps grow it again
    scale = 1e9
    for e in events:  # the history replays: halve on each overflow, double after 3 clean steps
        scale *= 0.5 if e["event"] == "overflow" else 2.0
        assert e["scale"] == scale
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == len(overflows)
    assert (out / "plots" / "loss_scale.png").stat().st_size > 1000


def test_inspect_precision_cli_json(capsys):
    from gradwise.cli import main

    assert main(["inspect", "precision", "--json", "--steps", "2", "data.num_samples=300", "model.name=mlp",
                 "model.width=16", "train.batch_size=32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recommendation"]["setting"].startswith("precision=")
    assert {"fp16", "bf16"} == set(report["totals"]) and report["layers"]


def test_master_weights_fp16_needs_fp16():
    with pytest.raises(Exception, match="master_weights=fp16 needs precision=fp16"):
        load_config(None, ["master_weights=fp16"])


def test_loss_scaler_skips_and_backs_off():
    scaler = LossScaler(ScalerConfig(init_scale=8.0, growth_interval=2))
    scaler.update(True)
    assert scaler.scale == 4.0 and scaler.skipped_steps == 1


class SharedOffset(nn.Module):
    """Adds one learned vector to every row: the offset's output, (16,), is shared by the whole batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(16, 16)
        self.offset = nn.Embedding(1, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x) + self.offset(torch.tensor(0))))


def test_micro_batched_inspection_sees_the_whole_batchs_gradient_of_a_batch_shared_output():
    whole = collect(tiny_trainer(SharedOffset()), steps=2)
    micro = collect(tiny_trainer(SharedOffset(), "train.micro_batch_size=8"), steps=2)
    a, b = whole["offset"].output_gradients, micro["offset"].output_gradients
    assert a.total == b.total == 2 * 16  # one (16,) gradient per step, not one per micro-batch
    assert a.counts == b.counts  # the summed micro-batch shares: the same magnitudes
    assert whole["body"].output_gradients.total == micro["body"].output_gradients.total == 2 * 64 * 16


def test_gradwise_inspect_precision_on_a_hugging_face_model_with_a_collate_function():
    """Dict batches built by a collate function of the user's, a GPT-2 of random weights: every Linear and
    embedding gets a row and a loss-scale recommendation comes back."""
    import gradwise
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32,
                                                                n_positions=16))
    tokens = torch.randint(0, 32, (32, 8))

    def collate(items):
        ids = torch.stack(items)
        return {"input_ids": ids, "labels": ids}

    report = gradwise.inspect_precision(gpt2, list(tokens), collate_fn=collate, steps=2,
                                        config=load_config(None, ["train.batch_size=8"]))
    assert report["steps"] == 2 and "transformer.wte" in {row["layer"] for row in report["layers"]}
    assert report["loss_scale"] > 0 and report["recommendation"]["setting"] in ("precision=bf16", "precision=fp16")
