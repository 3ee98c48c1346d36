"""Update rules of the asynchronous parameter server, as pure functions of tensors.

Each rule turns the gradient a worker pushed into the gradient the server's
optimizer applies (so every rule also works with momentum: the optimizer's
buffer receives the rule's output). With w the server's weights now, w_bak the
copy worker m pulled (its backup), tau the staleness (updates applied since
that pull):

    asgd             g                                    (Recht et al. style lock-free SGD)
    ssp              g; the server additionally keeps a fast worker at most s clocks ahead (Ho et al. 2013)
    staleness-aware  g / max(1, tau)                      (lr / tau; Zhang et al. 2016)
    dcasgd-c         g + lambda * g * g * (w - w_bak)     (Zheng et al. 2017, constant lambda)
    dcasgd-a         g + lambda_t * g * g * (w - w_bak),  lambda_t = lambda0 / sqrt(MS + eps),
                     MS <- m * MS + (1 - m) * g * g       (adaptive lambda; MS per element, updated first;
                                                          one MS for all workers, or one per worker as
                                                          Microsoft's Multiverso keeps it: ps.mean_square)
    ssgd             the mean of one gradient per worker, all computed at the same weights

The product g * g * (w - w_bak) is the diagonal approximation of the Hessian
(outer product of gradients) times the weights' drift since the pull: a
first-order Taylor correction of the stale gradient towards g(w).
"""

from __future__ import annotations

import collections
import statistics

import torch

RULES = ("asgd", "ssp", "staleness-aware", "dcasgd-c", "dcasgd-a", "ssgd")
DEFAULT_LAMBDA = {"dcasgd-c": 0.04, "dcasgd-a": 2.0}  # the paper's CIFAR-10 settings


def rule_lambda(rule: str, dc_lambda: float | None) -> float:
    """DC-ASGD's lambda (dcasgd-c) or lambda0 (dcasgd-a): `ps.dc_lambda`, else the paper's; 0 for other rules."""
    return dc_lambda if dc_lambda is not None else DEFAULT_LAMBDA.get(rule, 0.0)


SCALED_RULES = ("asgd", "ssp", "dcasgd-c", "dcasgd-a")  # ps.lr_scale applies to these


def async_lr_factor(rule: str, lr_scale: str, workers: int) -> float:
    """What `ps.lr_scale` multiplies optim.lr by under `workers` asynchronous workers.

    inverse-workers: 1/M for the rules that apply each gradient as it arrives, the stable step for the
    staleness M - 1 of M equally fast workers (measured in docs/async.md: the default AdamW job collapses at
    M=4 with the plain lr). ssgd averages synchronous gradients and staleness-aware divides by tau itself:
    both keep optim.lr.
    """
    return 1.0 / workers if lr_scale == "inverse-workers" and rule in SCALED_RULES else 1.0


def staleness_stats(staleness: list[int], histogram: bool = False) -> dict:
    """Mean and max (and, for a summary, the histogram) of the staleness of the gradients applied."""
    stats = {"staleness_mean": statistics.fmean(staleness) if staleness else 0.0,
             "staleness_max": max(staleness, default=0)}
    if histogram:
        counts = collections.Counter(staleness)
        stats["staleness_histogram"] = {str(k): counts[k] for k in sorted(counts)}
    return stats


def staleness_aware(grads: list[torch.Tensor], staleness: int) -> list[torch.Tensor]:
    scale = 1.0 / max(1, staleness)
    return [g * scale for g in grads]


def delay_compensated(grads: list[torch.Tensor], weights: list[torch.Tensor], backup: list[torch.Tensor],
                      lam: float | list[torch.Tensor]) -> list[torch.Tensor]:
    """g + lam * g * g * (w - w_bak); `lam` a number or one tensor per parameter (elementwise)."""
    lams = lam if isinstance(lam, list) else [lam] * len(grads)
    return [g + lam_i * g * g * (w - b) for g, w, b, lam_i in zip(grads, weights, backup, lams)]


def adaptive_lambda(grads: list[torch.Tensor], mean_square: list[torch.Tensor] | None, lambda0: float,
                    momentum: float, eps: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(lambda_t per parameter, updated mean square) for DC-ASGD-a; `mean_square` None starts at zero."""
    if mean_square is None:
        mean_square = [torch.zeros_like(g) for g in grads]
    updated = [momentum * ms + (1 - momentum) * g * g for ms, g in zip(mean_square, grads)]
    return [lambda0 / torch.sqrt(ms + eps) for ms in updated], updated


def mean_square_key(per_worker: bool, worker: int) -> str:
    """Where `state` keeps DC-ASGD-a's mean square: one for all workers, or worker `worker`'s own."""
    return f"mean_square/{worker}" if per_worker else "mean_square"


def apply_rule(rule: str, grads: list[torch.Tensor], weights: list[torch.Tensor], backup: list[torch.Tensor] | None,
               staleness: int, state: dict, lam: float, momentum: float = 0.95, eps: float = 1e-7,
               ms_key: str = "mean_square") -> list[torch.Tensor]:
    """The gradient the optimizer should apply under `rule`; `state[ms_key]` carries DC-ASGD-a's mean square
    (`mean_square_key`: the global one, or the pushing worker's)."""
    if rule in ("asgd", "ssp", "ssgd"):
        return grads
    if rule == "staleness-aware":
        return staleness_aware(grads, staleness)
    if rule == "dcasgd-c":
        return delay_compensated(grads, weights, backup, lam)
    if rule == "dcasgd-a":
        lams, state[ms_key] = adaptive_lambda(grads, state.get(ms_key), lam, momentum, eps)
        return delay_compensated(grads, weights, backup, lams)
    raise ValueError(f"unknown parameter-server rule {rule!r}; allowed: {', '.join(RULES)}")
