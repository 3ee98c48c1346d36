"""LAMB (You et al. 2019, arXiv 1904.00962 v5, Algorithm 2), vectorised with torch._foreach_*.

Per tensor w with gradient g, at step t:

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    m^ = m / (1 - b1^t)              v^ = v / (1 - b2^t)
    u  = m^ / (sqrt(v^) + eps) + wd w            (eps outside the sqrt, decay inside the ratio)
    r  = ||w|| / ||u||  (1 if either norm is 0; min(r, trust_clip) if set; 1 if the group has adapt=False)
    w  = w - lr r u

Computed as u = c * (m / (sqrt(v) + eps sqrt(bc2)) + (wd / c) w) with
c = sqrt(bc2) / bc1, which is the same quantity with one division instead of
three. Groups with adapt=False (biases, norm weights: many tiny tensors) keep
their moments as views into one flat buffer and update it with a handful of
whole-buffer ops, instead of paying a kernel dispatch per tensor per op. State (m, v) is fp32 whatever the
parameter dtype; `p.grad` is never modified and nothing is read back to the host. The last trust ratio of each
tensor is kept in `state["trust_ratio"]` (a 0-dim tensor) for diagnostics.
"""

from __future__ import annotations

import math

import torch

from gradwise.optim.layerwise import LayerwiseOptimizer, as_fp32, local, trust_ratios, write_back


def _per_tensor(values: list[float]) -> float | list[float]:
    """One scalar when all tensors share it (the usual case), else a list."""
    return values[0] if all(v == values[0] for v in values) else values


class LAMB(LayerwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, trust_clip: float | None = None, adapt: bool = True):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, trust_clip=trust_clip,
                        adapt=adapt)
        super().__init__(params, defaults)
        self._flat: dict[int, dict] = {}  # id(group) -> flat moments of a non-adapted group

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._flat.clear()  # loaded moments are new tensors; rebuild the flat views from them

    def _step_group(self, params: list[torch.Tensor], group: dict) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
        if not group["adapt"] and self.shard_sum is None and len({self.state[p]["step"] for p in params}) == 1:
            self._update_flat(params, group)
            return
        self.for_each_run(params, lambda run: self._update(run, group))

    def _flat_moments(self, params: list[torch.Tensor], group: dict) -> dict:
        """One fp32 buffer each for m and v of `params`; the per-tensor state becomes views into it."""
        key = tuple(id(p) for p in params)
        flat = self._flat.get(id(group))
        if flat is not None and flat["key"] == key:
            return flat
        sizes = [p.numel() for p in params]
        m = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
        v = torch.zeros_like(m)
        for p, m_i, v_i in zip(params, m.split(sizes), v.split(sizes)):
            state = self.state[p]
            m_i.copy_(state["exp_avg"].reshape(-1))
            v_i.copy_(state["exp_avg_sq"].reshape(-1))
            state["exp_avg"], state["exp_avg_sq"] = m_i.view_as(p), v_i.view_as(p)
        flat = self._flat[id(group)] = {"key": key, "sizes": sizes, "m": m, "v": v}
        return flat

    def _update_flat(self, params: list[torch.Tensor], group: dict) -> None:
        """The same update for a non-adapted group (trust ratio 1), on one flat buffer."""
        beta1, beta2 = group["betas"]
        flat = self._flat_moments(params, group)
        t = self.state[params[0]]["step"]
        m, v = flat["m"], flat["v"]
        g = torch.cat([p.grad.reshape(-1) for p in params]).float()
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        sqrt_bc2 = math.sqrt(1 - beta2**t)
        c = sqrt_bc2 / (1 - beta1**t)
        update = m / v.sqrt().add_(group["eps"] * sqrt_bc2)
        if group["weight_decay"]:
            update.add_(torch.cat([p.reshape(-1) for p in params]).float(), alpha=group["weight_decay"] / c)
        pieces = [u.view_as(p) for u, p in zip(update.split(flat["sizes"]), params)]
        torch._foreach_add_(params, pieces, alpha=-group["lr"] * c)

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        exp_avgs = [local(s["exp_avg"]) for s in states]
        exp_avg_sqs = [local(s["exp_avg_sq"]) for s in states]
        steps = [s["step"] for s in states]
        grads = as_fp32([local(p.grad) for p in params])
        params = [local(p) for p in params]
        params32 = as_fp32(params)

        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        sqrt_bc2 = [math.sqrt(1 - beta2**t) for t in steps]
        scale = [s / (1 - beta1**t) for s, t in zip(sqrt_bc2, steps)]  # c = sqrt(bc2) / bc1
        update = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(update, _per_tensor([group["eps"] * s for s in sqrt_bc2]))
        update = torch._foreach_div(exp_avgs, update)  # u / c, before decay
        if group["weight_decay"]:
            decay = _per_tensor([group["weight_decay"] / c for c in scale])
            if isinstance(decay, float):
                torch._foreach_add_(update, params32, alpha=decay)
            else:
                torch._foreach_add_(update, torch._foreach_mul(params32, decay))
        # w -= lr * r * u with u = c * update; for an adapted tensor r * c = ||w|| / ||update||
        c = torch.tensor(scale, dtype=torch.float32, device=params[0].device)
        if group["adapt"]:
            w_norms, u_norms = self.tensor_norms(params32, update)
            ratios = trust_ratios(w_norms, u_norms * c, clip=group["trust_clip"])
            for s, r in zip(states, ratios.unbind(0)):
                s["trust_ratio"] = r
            c = ratios * c
        torch._foreach_addcmul_(params32, update, list(c.unbind(0)), value=-group["lr"])
        write_back(params, params32)
