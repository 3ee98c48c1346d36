"""LAMB (You et al. 2019, arXiv 1904.00962 v5, Algorithm 2), vectorised with torch._foreach_*.

Per tensor w with gradient g, at step t:

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    m^ = m / (1 - b1^t)              v^ = v / (1 - b2^t)
    u  = m^ / (sqrt(v^) + eps) + wd w            (eps outside the sqrt, decay inside the ratio)
    r  = ||w|| / ||u||  (1 if either norm is 0; min(r, trust_clip) if set; 1 if the group has adapt=False)
    w  = w - lr r u

State (m, v) is fp32 whatever the parameter dtype; `p.grad` is never modified and
nothing is read back to the host. The last trust ratio of each tensor is kept
in `state["trust_ratio"]` (a 0-dim tensor) for diagnostics.
"""

from __future__ import annotations

import torch

from gradwise.optim.layerwise import as_fp32, norms, trust_ratios, write_back


class LAMB(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, trust_clip: float | None = None, adapt: bool = True):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyperparameters lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, trust_clip=trust_clip,
                        adapt=adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            exp_avgs, exp_avg_sqs, steps = [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            grads = as_fp32([p.grad for p in params])
            params32 = as_fp32(params)

            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

            m_hat = torch._foreach_div(exp_avgs, [1 - beta1**t for t in steps])
            denom = torch._foreach_div(exp_avg_sqs, [1 - beta2**t for t in steps])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(m_hat, denom)
            if group["weight_decay"]:
                torch._foreach_add_(update, params32, alpha=group["weight_decay"])

            if group["adapt"]:
                ratios = trust_ratios(norms(params32), norms(update), clip=group["trust_clip"]).unbind(0)
                torch._foreach_mul_(update, list(ratios))
                for p, r in zip(params, ratios):
                    self.state[p]["trust_ratio"] = r
            torch._foreach_add_(params32, update, alpha=-group["lr"])
            write_back(params, params32)
        return loss
