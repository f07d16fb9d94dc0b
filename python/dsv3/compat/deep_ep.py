"""DeepEP's Python API (`deep_ep.Buffer`, `Config`, `EventOverlap`) over dsv3.ep, so code written for DeepEP
runs unchanged — on a gloo group of CPU processes too:

    from dsv3.compat import deep_ep
    buffer = deep_ep.Buffer(group, int(1e9), 0)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \\
        buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = \\
        buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, ...)
    combined_x, _, event = buffer.combine(recv_x, handle)

The constructor, method signatures, return tuples and handle layouts are DeepEP's (intranode handle:
rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank,
send_head; low-latency handle: src_info, layout_range, T, hidden, num_experts). Where dsv3 differs: CPU
tensors and gloo groups work (through the `torch` backend); any rank count dividing the experts; bf16 is
not the only row dtype; the low-latency receive order is deterministic (sources ascending, then tokens);
`use_logfmt` is rejected. The semantics: SPEC §5 and dsv3.ep.
"""

from __future__ import annotations

import torch

from ..ep import Buffer as _Buffer
from ..ep import Config, EventOverlap

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]

topk_idx_t = torch.int64  # DeepEP's default TOPK_IDX_BITS=64


class Buffer(_Buffer):
    """`deep_ep.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False,
    num_qps_per_rank=24, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
    explicitly_destroy=False, enable_shrink=False, comm=None)` — the backend is chosen automatically."""

    def __init__(
        self,
        group,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm=None,
    ):
        super().__init__(
            group,
            num_nvl_bytes,
            num_rdma_bytes,
            low_latency_mode,
            num_qps_per_rank,
            allow_nvlink_for_low_latency_mode,
            allow_mnnvl,
            use_fabric,
            explicitly_destroy,
            enable_shrink,
            comm,
        )
