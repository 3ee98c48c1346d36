"""Would this run survive fp16 or bf16? Range analysis of activations, gradients and weight updates.

A few fp32 training steps run with hooks that histogram every value by its
binary exponent (bucket k holds 2^k <= |x| < 2^(k+1); zeros apart): each
layer's outputs, the gradients flowing back into them, its parameters'
gradients, and its weight updates relative to the weights. From the
histograms, for each format (seed 004's ranges):

    fp16  largest 65504, smallest normal 2^-14 (6.1e-5), smallest subnormal 2^-24 (5.96e-8), 10 mantissa bits
    bf16  largest ~3.39e38, smallest normal 2^-126, smallest subnormal 2^-133, 7 mantissa bits (fp32's exponent)

it reports the fraction of values that would overflow (become inf), flush to
zero (below the smallest subnormal) or lose precision as subnormals (below the
smallest normal); which layers are most at risk; the power-of-two loss scale
that moves the gradients into fp16's range; and the fraction of weight updates
smaller than half a unit in the last place of the weight (|dw| < 2^-(p+1) |w|
for p mantissa bits: 2^-11 in fp16), which fp16 weights would round away; the
reason to keep fp32 master weights. The arithmetic on histograms is pure: the
training steps that fill them are gradwise.tools.precision's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

MIN_EXPONENT, MAX_EXPONENT = -160, 130  # fp32 spans 2^-149 .. 2^128


@dataclass(frozen=True)
class Format:
    name: str
    max: float
    min_normal_exp: int  # smallest normal = 2^min_normal_exp
    min_subnormal_exp: int  # smallest subnormal = 2^min_subnormal_exp
    mantissa_bits: int


FORMATS = {
    "fp16": Format("fp16", 65504.0, -14, -24, 10),
    "bf16": Format("bf16", 3.3895313892515355e38, -126, -133, 7),
}


@dataclass
class Histogram:
    """Counts of values by binary exponent; `zeros` counts exact zeros."""

    counts: dict[int, int] = field(default_factory=dict)
    zeros: int = 0
    total: int = 0

    def add(self, t: torch.Tensor) -> None:
        """Count `t`'s values by reading each fp32 value's exponent field (two integer passes and a bincount):
        a normal value 1.f * 2^k lands in bucket k; inf/nan (field 255) above every format's range; field 0
        holds zeros and fp32 subnormals, whose buckets come from frexp (rare values: only those are looked at)."""
        x = t.detach().reshape(-1)
        x = (x if x.dtype == torch.float32 else x.float()).contiguous()
        field = (x.view(torch.int32) >> 23) & 0xFF
        by_field = torch.bincount(field, minlength=256).tolist()
        self.total += x.numel()
        for value, n in enumerate(by_field[1:255], start=1):
            if n:
                self.counts[value - 127] = self.counts.get(value - 127, 0) + n
        if by_field[255]:
            self.counts[MAX_EXPONENT] = self.counts.get(MAX_EXPONENT, 0) + by_field[255]
        if by_field[0]:
            zeros = int((x == 0).sum())
            self.zeros += zeros
            if by_field[0] > zeros:  # fp32 subnormals: |x| = m * 2^e with m in [0.5, 1), bucket e - 1
                tiny = x[(field == 0) & (x != 0)]
                for k, n in zip(*torch.unique(torch.frexp(tiny)[1] - 1, return_counts=True)):
                    self.counts[int(k)] = self.counts.get(int(k), 0) + int(n)

    def max_exponent(self) -> int | None:
        return max(self.counts) if self.counts else None

    def min_exponent(self) -> int | None:
        return min(self.counts) if self.counts else None


def range_fractions(h: Histogram, fmt: Format, log2_scale: int = 0) -> dict[str, float]:
    """Fractions of all values that overflow, flush to zero, or are subnormal in `fmt` after scaling by 2^log2_scale.

    Bucket k scaled lies in [2^(k+s), 2^(k+s+1)): it overflows when 2^(k+s) > max, flushes when
    2^(k+s+1) <= 2^min_subnormal, is subnormal when 2^(k+s+1) <= 2^min_normal (and does not flush).
    """
    if h.total == 0:
        return {"overflow": 0.0, "flush_to_zero": 0.0, "subnormal": 0.0}
    overflow = flush = subnormal = 0
    for k, n in h.counts.items():
        e = k + log2_scale
        if 2.0 ** e > fmt.max:
            overflow += n
        elif e + 1 <= fmt.min_subnormal_exp:
            flush += n
        elif e + 1 <= fmt.min_normal_exp:
            subnormal += n
    return {"overflow": overflow / h.total, "flush_to_zero": flush / h.total, "subnormal": subnormal / h.total}


def loss_scale_for(h: Histogram, fmt: Format = FORMATS["fp16"], headroom_exp: int = 1, max_exp: int = 24) -> int:
    """log2 of the power-of-two loss scale that lifts the gradients as far as possible without overflow.

    The largest gradient bucket is placed `headroom_exp` octaves below the format's largest value (dynamic
    scaling's growth will probe the rest), never scaling up by more than 2^max_exp or down at all
    unless the gradients already overflow.
    """
    top = h.max_exponent()
    if top is None:
        return 0
    fits = math.floor(math.log2(fmt.max)) - headroom_exp - top  # the top bucket lands at 2^(15 - headroom)
    return min(fits, max_exp)  # negative: the gradients already overflow and must be scaled down


@dataclass
class LayerRecord:
    activations: Histogram = field(default_factory=Histogram)  # the module's outputs
    output_gradients: Histogram = field(default_factory=Histogram)  # gradients flowing back into its outputs
    gradients: Histogram = field(default_factory=Histogram)  # its parameters' gradients
    update_ratio: Histogram = field(default_factory=Histogram)  # |dw| / |w| per element (w != 0)


def lost_update_fraction(h: Histogram, fmt: Format) -> float:
    """Fraction of weight updates below half an ulp of their weight (|dw|/|w| < 2^-(p+1)): lost in `fmt` weights.

    Zero updates (a weight the step did not move) are not counted as lost."""
    moved = h.total - h.zeros
    if moved == 0:
        return 0.0
    lost = sum(n for k, n in h.counts.items() if k + 1 <= -(fmt.mantissa_bits + 1))
    return lost / moved


def analyse(records: dict[str, LayerRecord], risk_threshold: float = 1e-3) -> dict[str, Any]:
    """Per-layer fractions for fp16 and bf16, the layers at risk, a loss scale, and a recommendation."""
    layers = []
    all_grads, all_acts, all_updates, all_backward = Histogram(), Histogram(), Histogram(), Histogram()
    for name, rec in records.items():
        row: dict[str, Any] = {"layer": name}
        for kind, h in (("activations", rec.activations), ("output_gradients", rec.output_gradients),
                        ("gradients", rec.gradients)):
            if h.total:
                for fmt in FORMATS.values():
                    row[f"{kind}_{fmt.name}"] = range_fractions(h, fmt)
                row[f"{kind}_log2_range"] = [h.min_exponent(), h.max_exponent()]
        if rec.update_ratio.total:
            row["updates_lost_fp16"] = lost_update_fraction(rec.update_ratio, FORMATS["fp16"])
            row["updates_lost_bf16"] = lost_update_fraction(rec.update_ratio, FORMATS["bf16"])
        row["risk_fp16"] = _risk(row, "fp16")
        row["risk_bf16"] = _risk(row, "bf16")
        layers.append(row)
        _merge(all_acts, rec.activations)
        _merge(all_grads, rec.gradients)
        _merge(all_updates, rec.update_ratio)
        _merge(all_backward, rec.gradients)
        _merge(all_backward, rec.output_gradients)

    # the loss scale multiplies every gradient of the backward pass: parameters' and activations' alike
    scale_exp = loss_scale_for(all_backward)
    totals = {fmt.name: {"activations": range_fractions(all_acts, fmt), "gradients": range_fractions(all_grads, fmt),
                         "backward": range_fractions(all_backward, fmt),
                         "gradients_at_loss_scale": range_fractions(all_grads, fmt, scale_exp if fmt.name == "fp16"
                                                                    else 0),
                         "backward_at_loss_scale": range_fractions(all_backward, fmt, scale_exp if fmt.name == "fp16"
                                                                   else 0),
                         "updates_lost": lost_update_fraction(all_updates, fmt)} for fmt in FORMATS.values()}
    at_risk = {f: [r["layer"] for r in sorted(layers, key=lambda r: -r[f"risk_{f}"]) if r[f"risk_{f}"] > risk_threshold]
               for f in FORMATS}
    return {"layers": layers, "totals": totals, "loss_scale": 2.0 ** scale_exp, "loss_scale_log2": scale_exp,
            "at_risk": at_risk, "recommendation": recommend(totals, scale_exp, risk_threshold)}


def _risk(row: dict[str, Any], fmt: str) -> float:
    """How much of a layer's values this format mangles: overflow counts fully, flush too, subnormal half."""
    score = 0.0
    for kind in ("activations", "output_gradients", "gradients"):
        f = row.get(f"{kind}_{fmt}")
        if f:
            score = max(score, f["overflow"] + f["flush_to_zero"] + 0.5 * f["subnormal"])
    return score


def _merge(into: Histogram, h: Histogram) -> None:
    into.total += h.total
    into.zeros += h.zeros
    for k, n in h.counts.items():
        into.counts[k] = into.counts.get(k, 0) + n


def recommend(totals: dict[str, Any], scale_exp: int, threshold: float) -> dict[str, Any]:
    """A precision and loss-scale setting, with the reasons, from the format totals."""
    fp16, bf16 = totals["fp16"], totals["bf16"]
    reasons = []
    fp16_acts_ok = fp16["activations"]["overflow"] <= threshold
    scaled = fp16["gradients_at_loss_scale"]
    fp16_grads_ok = (scaled["overflow"] <= threshold and scaled["flush_to_zero"] <= threshold
                     and fp16["backward_at_loss_scale"]["overflow"] <= threshold)
    bf16_ok = all(bf16[k]["overflow"] + bf16[k]["flush_to_zero"] <= threshold
                  for k in ("activations", "gradients", "backward"))
    if not fp16_acts_ok:
        reasons.append(f"{fp16['activations']['overflow']:.2%} of activations exceed fp16's 65504 (a loss scale "
                       "cannot fix the forward pass)")
    if fp16["gradients"]["flush_to_zero"] > threshold:
        reasons.append(f"{fp16['gradients']['flush_to_zero']:.2%} of gradients would flush to zero in fp16 unscaled; "
                       f"a loss scale of 2^{scale_exp} leaves {scaled['flush_to_zero']:.2%}")
    if fp16["updates_lost"] > threshold:
        reasons.append(f"{fp16['updates_lost']:.2%} of weight updates are below half an fp16 ulp of their weight: "
                       "keep fp32 master weights (gradwise's fp16 and bf16 modes do)")
    if bf16_ok:
        setting = "precision=bf16"
        reasons.append("bf16 has fp32's exponent range: no overflow or flush to zero here")
    elif fp16_acts_ok and fp16_grads_ok:
        setting = f"precision=fp16 scaler.init_scale={2.0 ** scale_exp:g}"
    else:
        setting = "precision=fp32"
        reasons.append("neither half format holds these values")
    fp16_setting = (f"precision=fp16 scaler.init_scale={2.0 ** scale_exp:g}" if fp16_acts_ok and fp16_grads_ok
                    else None)
    return {"setting": setting, "fp16_setting": fp16_setting, "reasons": reasons}


def format_report(report: dict[str, Any], top: int = 8) -> str:
    """A terminal summary: totals per format, the riskiest layers, the loss scale and the recommendation."""
    lines = []
    for name, t in report["totals"].items():
        a, g = t["activations"], t["gradients"]
        lines.append(f"{name}: activations overflow {a['overflow']:.3%} flush {a['flush_to_zero']:.3%} subnormal "
                     f"{a['subnormal']:.3%} | gradients overflow {g['overflow']:.3%} flush {g['flush_to_zero']:.3%} "
                     f"subnormal {g['subnormal']:.3%} | updates lost in {name} weights {t['updates_lost']:.3%}")
    scaled = report["totals"]["fp16"]["gradients_at_loss_scale"]
    lines.append(f"fp16 loss scale 2^{report['loss_scale_log2']} = {report['loss_scale']:g}: gradients then overflow "
                 f"{scaled['overflow']:.3%}, flush {scaled['flush_to_zero']:.3%}, subnormal {scaled['subnormal']:.3%}")
    lines.append("")
    lines.append(f"{'layer':40s} {'fp16 risk':>10s} {'bf16 risk':>10s} {'act log2 range':>15s} "
                 f"{'grad log2 range':>16s} {'upd lost fp16':>14s}")
    rows = sorted(report["layers"], key=lambda r: -r["risk_fp16"])[:top]
    for r in rows:
        act = r.get("activations_log2_range") or ["-", "-"]
        grad = r.get("gradients_log2_range") or ["-", "-"]
        lost = r.get("updates_lost_fp16")
        lines.append(f"{r['layer'][:40]:40s} {r['risk_fp16']:10.3%} {r['risk_bf16']:10.3%} "
                     f"{str(act[0]) + '..' + str(act[1]):>15s} {str(grad[0]) + '..' + str(grad[1]):>16s} "
                     f"{(f'{lost:.2%}' if lost is not None else '-'):>14s}")
    for fmt, names in report["at_risk"].items():
        lines.append(f"at risk in {fmt}: {', '.join(names[:6]) or 'none'}")
    rec = report["recommendation"]
    lines.append("")
    lines.append(f"recommended: {rec['setting']}")
    if rec["fp16_setting"] and rec["fp16_setting"] != rec["setting"]:
        lines.append(f"for fp16 hardware: {rec['fp16_setting']}")
    lines.extend(f"  - {reason}" for reason in rec["reasons"])
    return "\n".join(lines)
