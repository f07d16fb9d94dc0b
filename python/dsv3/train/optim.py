"""AdamW with fp32 master weights and bf16 moments (report §3.3: the optimizer states in BF16, master
weights and gradients in FP32), and the learning-rate schedule: linear warmup, constant, cosine decay."""

from __future__ import annotations

import math

import torch


class AdamW(torch.optim.Optimizer):
    """Decoupled weight decay Adam; exp_avg and exp_avg_sq are stored in bfloat16, the update is computed
    in fp32 from the fp32 gradient and applied to the fp32 parameter.

    Each step runs as a few multi-tensor (`torch._foreach_*`) operations per group of parameters at the same
    step count, instead of a dozen small operations per parameter: one kernel per operation on a GPU, no
    Python loop over parameters on the CPU. The arithmetic per element is the per-parameter formula's."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(
                f"AdamW: invalid hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}"
            )
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            # parameters with a gradient, by (device, step count after this step): one bias correction each
            buckets: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32:
                    raise TypeError(f"AdamW: parameters must be fp32 masters, got {p.dtype}")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                buckets.setdefault((p.device, state["step"]), []).append(p)
            for (_, k), params in buckets.items():
                self._update(group, k, params)

    def _update(self, group: dict, k: int, params: list[torch.Tensor]) -> None:
        b1, b2 = group["betas"]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
        m = [torch.empty_like(p) for p in params]  # the moments in fp32 for this step's arithmetic
        v = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(m, exp_avgs)
        torch._foreach_copy_(v, exp_avg_sqs)
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        torch._foreach_copy_(exp_avgs, m)
        torch._foreach_copy_(exp_avg_sqs, v)
        denom = torch._foreach_div(v, 1 - b2**k)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_addcdiv_(params, m, denom, value=-group["lr"] / (1 - b1**k))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms (and any bias/vector) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int, decay_start: int) -> float:
    """Linear warmup over `warmup` steps, constant until `decay_start`, cosine to min_lr at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step < decay_start or total <= decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
