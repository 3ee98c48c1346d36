"""LARS (You et al. 2017, arXiv 1708.03888) with momentum, vectorised with torch._foreach_*.

Per tensor w with gradient g:

    local_lr = eta ||w|| / (||g|| + wd ||w||)   (1 if ||w|| or ||g|| is 0; min(., trust_clip) if set;
                                                  1 if the group has adapt=False)
    v = momentum v + lr local_lr (g + wd w)
    w = w - v

`eta` is the trust coefficient. The momentum buffer is fp32 whatever the
parameter dtype; `p.grad` is never modified and nothing is read back to the
host. The last local lr of each tensor is kept in `state["trust_ratio"]`.
"""

from __future__ import annotations

import torch

from gradwise.optim.layerwise import LayerwiseOptimizer, as_fp32, local, trust_ratios, write_back


class LARS(LayerwiseOptimizer):
    def __init__(self, params, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, trust_clip: float | None = None, adapt: bool = True):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"invalid LARS hyperparameters lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        trust_clip=trust_clip, adapt=adapt)
        super().__init__(params, defaults)

    def _step_group(self, params: list[torch.Tensor], group: dict) -> None:
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        self.for_each_run(params, lambda run: self._update(run, group))

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        wd = group["weight_decay"]
        states = [self.state[p] for p in params]
        bufs = [local(s["momentum_buffer"]) for s in states]
        grads = as_fp32([local(p.grad) for p in params])
        params = [local(p) for p in params]
        params32 = as_fp32(params)
        direction = torch._foreach_add(grads, params32, alpha=wd) if wd else grads
        torch._foreach_mul_(bufs, group["momentum"])
        if group["adapt"]:
            w_norms, g_norms = self.tensor_norms(params32, grads)
            local_lr = trust_ratios(w_norms, g_norms + wd * w_norms, group["trust_coefficient"],
                                    group["trust_clip"]).unbind(0)
            for s, r in zip(states, local_lr):
                s["trust_ratio"] = r
            torch._foreach_addcmul_(bufs, direction, list(local_lr), value=group["lr"])  # v = m v + lr local (g + wd w)
        else:
            torch._foreach_add_(bufs, direction, alpha=group["lr"])
        torch._foreach_sub_(params32, bufs)
        write_back(params, params32)
