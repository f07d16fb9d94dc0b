"""The dispatch layout of expert parallelism (SPEC §5, DeepEP's `get_dispatch_layout`): from each token's
top-k expert ids, how many tokens every rank, node and expert receives and which ranks each token goes to.

`dispatch_layout_reference` (= `dsv3.ops.reference.ep_dispatch_layout`) is the readable definition in plain
PyTorch; `dispatch_layout` runs the
`torch.ops.dsv3.ep_dispatch_layout` kernels (CPU, CUDA, Meta) behind the same signature.
"""

from __future__ import annotations

import torch

import dsv3  # noqa: F401  (registers torch.ops.dsv3)

from ..ops import reference

__all__ = ["dispatch_layout", "dispatch_layout_reference"]

dispatch_layout_reference = reference.ep_dispatch_layout

LayoutResult = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]


def _check_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"dispatch_layout: {name} must be an int, got {type(value).__name__}")


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int = 8
) -> LayoutResult:
    """`dispatch_layout_reference`'s result from the dsv3 kernels, with `num_tokens_per_rdma_rank` None
    when every rank sits on one node (DeepEP's convention). `topk_idx` is int64 or int32, any strides;
    an entry outside [-1, num_experts) raises ValueError (on CUDA this waits for the kernel)."""
    if not isinstance(topk_idx, torch.Tensor):
        raise TypeError(f"dispatch_layout: topk_idx must be a torch.Tensor, got {type(topk_idx).__name__}")
    _check_int(num_experts, "num_experts")
    _check_int(num_ranks, "num_ranks")
    _check_int(num_ranks_per_node, "num_ranks_per_node")
    per_rank, per_rdma_rank, per_expert, in_rank = torch.ops.dsv3.ep_dispatch_layout(
        topk_idx, num_experts, num_ranks, num_ranks_per_node
    )
    return per_rank, (per_rdma_rank if num_ranks > num_ranks_per_node else None), per_expert, in_rank
