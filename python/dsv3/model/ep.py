"""Expert parallelism over torch.distributed (SPEC §5, §7): each rank of a process group holds a contiguous
block of E / R routed experts (rank r: global ids [r·E/R, (r+1)·E/R), `Experts.expert_ids`), and the MoE
layers exchange token rows with `all_to_all_single` instead of running every expert locally.

    model = build_model(cfg, expert_ids=local_expert_ids(cfg.n_routed_experts, rank, world))
    load the weights (from_pretrained(..., expert_ids=...) or `load_expert_shard(model, full_state_dict)`)
    enable_expert_parallel(model)  # every MoE layer (MTP's too) now dispatches with AllToAllDispatcher

`AllToAllDispatcher` is the portable reference path (gloo on CPU, NCCL on GPU) of DeepEP's dispatch/combine:
rows travel ordered by destination rank then expert, arrive ordered by source rank then source token, are
regrouped by local expert, computed, sent back with the reverse exchange, and weighted and summed in fp32 in
exactly the order `LocalDispatcher` uses, so the output matches one process holding every expert bit for bit
whenever the expert math is row-independent (fp32/bf16 GEMMs, FP8 with 1×128 per-row activation tiles). The
whole path is differentiable; the backward runs the reverse exchanges on every rank in the same order. A dead
or stalled peer surfaces as the process group's timeout error (never a hang beyond it).

This module is the expert-parallel hook of `MoE.dispatcher`; the `dsv3.ep` package (DeepEP-compatible
`Buffer` with NVLink / NVSHMEM backends) installs its own dispatcher through the same hook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .moe import Experts, MoE

__all__ = [
    "AllToAllDispatcher",
    "all_to_all",
    "clip_grad_norm_",
    "enable_expert_parallel",
    "expert_parallel_parameters",
    "gather_expert_state_dict",
    "is_expert_parallel",
    "load_expert_shard",
    "local_expert_ids",
]

_EP_ATTR = "_dsv3_expert_parallel"  # set on routed-expert parameters owned by one rank (not replicated)
# dtypes every gloo build moves natively; anything else (bf16, fp16, fp8) travels as its raw bytes
_GLOO_NATIVE = {torch.float32, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8}
_FP8_DTYPES = {
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
}


def local_expert_ids(num_experts: int, rank: int, world: int) -> torch.Tensor:
    """The global ids of the routed experts rank `rank` of `world` holds: [rank·E/R, (rank+1)·E/R)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"local_expert_ids: rank must be in [0, world), got rank={rank} world={world}")
    if num_experts < 1 or num_experts % world:
        raise ValueError(
            f"local_expert_ids: n_routed_experts ({num_experts}) must be a positive multiple of the "
            f"expert-parallel world size ({world})"
        )
    per = num_experts // world
    return torch.arange(rank * per, (rank + 1) * per, dtype=torch.long)


def is_expert_parallel(p: torch.Tensor) -> bool:
    """True for a routed-expert parameter owned by this rank under expert parallelism: its gradient comes
    from the all-to-all backward only, so data-parallel gradient averaging must not all-reduce it."""
    return bool(getattr(p, _EP_ATTR, False))


def expert_parallel_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if is_expert_parallel(p)]


# ---- the exchange --------------------------------------------------------------------------------------


def _backend(group) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:  # pragma: no cover - a backend name is always known for an initialized group
        return ""


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single of the rows of a 2-D tensor; dtypes the backend may not carry go as raw bytes."""
    x = x.contiguous()
    wire = x
    as_bytes = x.dtype in _FP8_DTYPES or ("gloo" in _backend(group) and x.dtype not in _GLOO_NATIVE)
    if as_bytes:
        wire = x.view(torch.uint8) if x.dim() > 1 else x.unsqueeze(1).view(torch.uint8)
    out = wire.new_empty((sum(recv_splits), *wire.shape[1:]))
    dist.all_to_all_single(out, wire, recv_splits, send_splits, group=group)
    if as_bytes:
        out = out.view(x.dtype)
        if x.dim() == 1:
            out = out.squeeze(1)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows out by `send_splits`, in by `recv_splits`; the backward sends the gradients the reverse way. It
    always runs its exchange (even when no input needs a gradient) so every rank takes part."""

    @staticmethod
    def forward(ctx, x, anchor, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        g = _exchange(grad, recv_splits, send_splits, ctx.group)
        anchor_grad = grad.new_zeros(0) if ctx.needs_input_grad[1] else None
        return (g if ctx.needs_input_grad[0] else None), anchor_grad, None, None, None


def all_to_all(
    x: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group=None,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable `all_to_all_single` over the rows of x (send_splits[i] rows to rank i, recv_splits[i]
    rows from it). `anchor` (an empty tensor requiring grad) keeps the node in the graph on every rank."""
    if x.dim() < 1 or x.shape[0] != sum(send_splits):
        raise ValueError(
            f"all_to_all: x has {x.shape[0] if x.dim() else 0} rows, send_splits sum to {sum(send_splits)}"
        )
    return _AllToAll.apply(x, anchor, list(send_splits), list(recv_splits), group)


class AllToAllDispatcher:
    """`MoE.dispatcher` for expert parallelism: the same call as `LocalDispatcher`,
    `(x [T, H], topk_idx [T, k], topk_weights [T, k], experts) -> [T, H]` in x's dtype, where `experts` holds
    this rank's block of `num_experts` (default: E_local × world). `-1` in topk_idx means no expert."""

    def __init__(self, group=None, num_experts: int | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("AllToAllDispatcher: torch.distributed is not initialized")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if num_experts is not None:
            local_expert_ids(num_experts, self.rank, self.world)  # validates divisibility
        self.num_experts = num_experts

    def _check(self, x, topk_idx, topk_weights, experts) -> tuple[int, int]:
        if not isinstance(experts, Experts):
            raise TypeError(
                f"AllToAllDispatcher: experts must be an Experts module, got {type(experts).__name__}"
            )
        e_local = len(experts.expert_ids)
        num_experts = self.num_experts if self.num_experts is not None else e_local * self.world
        want = local_expert_ids(num_experts, self.rank, self.world).to(experts.expert_ids.device)
        if e_local != len(want) or not torch.equal(experts.expert_ids.long(), want):
            raise ValueError(
                f"AllToAllDispatcher: rank {self.rank} of {self.world} must hold experts "
                f"[{int(want[0])}, {int(want[-1]) + 1}) of {num_experts}, holds {experts.expert_ids.tolist()}"
            )
        if x.dim() != 2:
            raise ValueError(f"AllToAllDispatcher: x must be [T, hidden], got shape {tuple(x.shape)}")
        if (
            topk_idx.dim() != 2
            or topk_idx.shape[0] != x.shape[0]
            or topk_idx.dtype not in (torch.int64, torch.int32)
        ):
            raise ValueError(
                f"AllToAllDispatcher: topk_idx must be int64/int32 [T={x.shape[0]}, k], got "
                f"{topk_idx.dtype} {tuple(topk_idx.shape)}"
            )
        if topk_weights.shape != topk_idx.shape:
            raise ValueError(
                f"AllToAllDispatcher: topk_weights must have topk_idx's shape {tuple(topk_idx.shape)}, got "
                f"{tuple(topk_weights.shape)}"
            )
        if topk_idx.numel() and (int(topk_idx.max()) >= num_experts or int(topk_idx.min()) < -1):
            raise ValueError(f"AllToAllDispatcher: topk_idx entries must be in [-1, {num_experts})")
        return num_experts, e_local

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, experts: Experts):
        num_experts, e_local = self._check(x, topk_idx, topk_weights, experts)
        world, group, dev = self.world, self.group, x.device
        k = topk_idx.shape[1]
        flat = topk_idx.flatten().long()
        # (token, k) pairs sorted by expert (= by destination rank, then expert), stable; -1 pairs dropped
        order = torch.argsort(torch.where(flat >= 0, flat, num_experts), stable=True)
        order = order[: int((flat >= 0).sum())]
        expert = flat[order]
        token = order // k
        send_per_expert = torch.bincount(expert, minlength=num_experts).view(world, e_local)
        recv_per_expert = _exchange(send_per_expert.cpu(), [1] * world, [1] * world, group)  # [src, e_local]
        send_splits = send_per_expert.sum(1).tolist()
        recv_splits = recv_per_expert.sum(1).tolist()

        anchor = torch.empty(0, device=dev, requires_grad=True) if torch.is_grad_enabled() else None
        rows = x.index_select(0, token)
        recv = all_to_all(rows, send_splits, recv_splits, group, anchor)  # by source rank, then token
        local_idx = torch.repeat_interleave(
            torch.arange(e_local, device=dev).repeat(world), recv_per_expert.flatten().to(dev)
        )
        perm = torch.argsort(local_idx, stable=True)  # regroup by local expert, sources in rank order
        out = experts(recv[perm], local_idx[perm])
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm), device=dev)
        out = out[inv]
        if anchor is not None and not out.requires_grad:  # no rows here: keep the backward exchange wired
            out = torch.where(torch.zeros((), dtype=torch.bool, device=dev), recv.to(out.dtype), out)
        back = all_to_all(out, recv_splits, send_splits, group, anchor)  # in `order` again
        y = torch.zeros(x.shape, dtype=torch.float32, device=dev)
        y.index_add_(0, token, back.float() * topk_weights.flatten()[order].unsqueeze(1))
        return y.to(x.dtype)


# ---- model-level helpers -------------------------------------------------------------------------------


def _expert_modules(model: nn.Module) -> list[tuple[str, Experts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]


def enable_expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Install `AllToAllDispatcher` in every MoE layer of `model` (MTP's included) and mark the routed-expert
    parameters (`is_expert_parallel`) so data-parallel gradient averaging skips them; the non-expert
    parameters stay replicated and averaged. The model must have been built with
    `expert_ids=local_expert_ids(n_routed_experts, rank, world)` for `group`. Returns the model.

    The `dsv3.ep` package (DeepEP-compatible Buffer, NVLink/NVSHMEM backends) replaces this dispatcher with
    its own through the same `MoE.dispatcher` hook."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("enable_expert_parallel: the model has no MoE layer")
    for moe in layers:
        dispatcher = AllToAllDispatcher(group, moe.gate.cfg.n_routed_experts)
        dispatcher._check(
            torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), moe.experts
        )  # the expert block matches this rank
        moe.dispatcher = dispatcher
        for p in moe.experts.parameters():
            setattr(p, _EP_ATTR, True)
    return model


@torch.no_grad()
def load_expert_shard(model: nn.Module, full_state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a full model's state dict into an expert-parallel `model`: replicated tensors as they are, the
    stacked routed experts as the rows of this model's `expert_ids`."""
    local = model.state_dict(keep_vars=True)
    experts = dict(_expert_modules(model))
    missing = sorted(set(local) - set(full_state_dict))
    if missing:
        raise KeyError(f"load_expert_shard: the full state dict lacks {missing[:10]}")
    for key, t in local.items():
        src = full_state_dict[key]
        owner, _, leaf = key.rpartition(".")
        if owner in experts and leaf.removesuffix("_scale_inv") in Experts.PROJECTIONS:
            src = src[experts[owner].expert_ids.to(src.device)]
        if src.shape != t.shape:
            raise ValueError(
                f"load_expert_shard: {key} has shape {tuple(src.shape)}, model wants {tuple(t.shape)}"
            )
        t.copy_(src)
    return model


@torch.no_grad()
def gather_expert_state_dict(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """The full model's state dict on every rank: each stacked routed-expert tensor all-gathered (in rank
    order, i.e. global expert order) and concatenated; replicated tensors as they are. Collective."""
    world = dist.get_world_size(group)
    experts = dict(_expert_modules(model))
    out = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in experts and leaf.removesuffix("_scale_inv") in Experts.PROJECTIONS:
            t = t.contiguous()
            wire = t.view(torch.uint8) if t.dtype in _FP8_DTYPES or t.dtype not in _GLOO_NATIVE else t
            parts = [torch.empty_like(wire) for _ in range(world)]
            dist.all_gather(parts, wire, group=group)
            t = torch.cat(parts).view(t.dtype)
        out[key] = t
    return out


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, group=None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for an expert-parallel model: the total 2-norm counts the replicated
    gradients once and sums the squares of the rank-owned expert gradients over `group`, so every rank
    clips by the same factor as one process holding the whole model would. Returns the total norm."""
    params = [p for p in parameters if p.grad is not None]
    dev = params[0].grad.device if params else torch.device("cpu")
    shared = torch.zeros((), dtype=torch.float32, device=dev)
    owned = torch.zeros((), dtype=torch.float32, device=dev)
    for p in params:
        sq = p.grad.detach().float().pow(2).sum()
        if is_expert_parallel(p):
            owned += sq
        else:
            shared += sq
    dist.all_reduce(owned, group=group)
    total = (shared + owned).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    return total
